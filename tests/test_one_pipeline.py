"""The pseudo-label stage exists once (issue 20): every client — the predictor, the trainer's step, its validation,
the synthetic scorer and the app — labels the same scene through :func:`excelseg.pseudo.pseudo_labels`, and where
their protocols agree (static CAMs, attention affinity, same τ_box) they give the same labels.

The shipped synthetic CLIP and heads on one generated scene at the CLIP's own 96 px input (so every client's
network input is the scene itself).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg import CamPredictor, build_model, load_clip
from excelseg.preprocess import network_input
from excelseg.synthetic import SceneGenerator, synthetic_vocabulary
from excelseg.synthetic.knowledge import synthetic_bank
from excelseg.synthetic.trained import heads_path

TAU = 0.79


@pytest.fixture(scope="module")
def world():
    clip = load_clip("synthetic", device="cpu")
    cfg0 = build_model(clip, device="cpu").config
    heads = replace(cfg0.heads, train_box_threshold=TAU, val_box_threshold=TAU)
    cfg = cfg0.with_(refine=replace(cfg0.refine, box_threshold=TAU), heads=heads)
    vocab = synthetic_vocabulary()
    bank = synthetic_bank(clip, template=cfg.text.template)
    scene = next(s for s in (SceneGenerator(size=96, seed=20261207).scene(i) for i in range(20))
                 if len(s.labels) >= 2)
    trained = build_model(clip, vocabulary=vocab, bank=bank, checkpoint=heads_path(), config=cfg,
                          device="cpu").eval()
    free = build_model(clip, vocabulary=vocab, bank=bank, config=cfg, device="cpu")
    names = [vocab.names[i] for i in scene.labels]
    want = CamPredictor(free).set_image(scene.image).predict(names).pseudo_label
    return {"clip": clip, "cfg": cfg, "vocab": vocab, "scene": scene, "trained": trained, "free": free,
            "names": names, "want": want}


def _x(world):
    cfg = world["cfg"]
    return network_input(world["scene"].image, tuple(cfg.cam.size), cfg.cam.normalization)[None]


def _labels(world):
    cls = torch.zeros(1, world["vocab"].num_classes)
    cls[0, list(world["scene"].labels)] = 1.0
    return cls


def test_the_predictor_finds_the_scene(world):
    """The reference labels are not trivial: at least two classes and the background appear."""
    assert len(np.unique(world["want"])) >= 3


def test_predict_batch_equals_one_by_one(world):
    """Several images (different sizes, different class counts) in one batched forward and one batched
    pseudo-label call = one at a time (the batched matmuls round differently: scores to float32 rounding, labels
    on ≥ 99.9 % of pixels)."""
    gen = SceneGenerator(size=96, seed=5)
    scenes = [gen.scene(i) for i in range(3)]
    images = [scenes[0].image, np.asarray(Image.fromarray(scenes[1].image).resize((130, 70))), scenes[2].image]
    classes = [[world["vocab"].names[i] for i in s.labels] for s in scenes]
    p = CamPredictor(world["free"])
    states = p.encode_batch(images)
    batched = p.predict_states(states, classes)
    for img, names, got in zip(images, classes, batched):
        one = p.set_image(img).predict(names)
        assert got.pseudo_label.shape == img.shape[:2]
        assert (got.pseudo_label == one.pseudo_label).mean() >= 0.999
        torch.testing.assert_close(got.scores, one.scores, rtol=1e-4, atol=1e-5 * float(one.scores.abs().max()))
        torch.testing.assert_close(got.grid_cams, one.grid_cams, rtol=1e-4, atol=1e-5)  # min–max normalised: [0, 1]
        torch.testing.assert_close(torch.from_numpy(got.raw_cams), torch.from_numpy(one.raw_cams), rtol=1e-4,
                                   atol=1e-5)


def test_trainer_step_labels(world):
    """The trainer's step before the LVC switch (static CAMs, attention affinity) = the predictor's labels; its
    PAR image is the de-normalised uint8 crop (EXCEL_SPEC §3.4), so rounding may move a few pixels."""
    from excelseg.train.step import training_losses

    model = world["trained"]
    step = training_losses(model, _x(world), _labels(world), 0, world["cfg"].train)
    got = step.pseudo[0].numpy()
    assert (got == world["want"]).mean() >= 0.999


def test_synthetic_scorer_labels(world):
    """The synthetic scorer (``lvc=False``) scores exactly the predictor's labels: same confusion matrix."""
    from excelseg.metrics import SegmentationMetric
    from excelseg.synthetic.seeds import pseudo_label_miou

    scene, vocab = world["scene"], world["vocab"]
    got = pseudo_label_miou(world["trained"], [(scene.image, scene.mask, scene.labels)], vocab, lvc=False)
    m = SegmentationMetric(vocab.num_classes + 1)
    m.update(world["want"], scene.mask)
    assert got["confusion"] == m.compute()["confusion"]


def test_validation_labels(world):
    """Validation (static CAMs, P-guided affinity, EXCEL_SPEC §4.2) = the one function called with that protocol;
    and with an all-ones P it is the static refinement, i.e. the predictor's labels."""
    from excelseg.train import validate

    scene, model = world["scene"], world["trained"]

    class One:
        class_names = world["vocab"].names

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": scene.image, "mask": scene.mask, "label": _labels(world)[0].numpy()}

    seen = []
    validate(model, One(), world["cfg"], torch.device("cpu"), on_image=lambda i, s, p, seg: seen.append(p))
    x = _x(world)
    out = model(x)
    want = model.labels_from_output(out, x, _labels(world), scene.mask.shape, lvc=False, guided=True,
                                    box_threshold=TAU)[0].numpy()
    assert np.array_equal(seen[0], want)
    out.affinity = torch.ones_like(out.affinity)  # P ≡ 1: every layer kept, the product is the plain mean
    flat = model.labels_from_output(out, x, _labels(world), scene.mask.shape, lvc=False, guided=True,
                                    box_threshold=TAU)[0].numpy()
    assert np.array_equal(flat, world["want"])


def test_app_labels(world, tmp_path):
    """The app's request (synthetic vocabulary, the shipped CLIP's own knowledge) writes the predictor's labels."""
    from excelseg.app import AppModel, Switches
    from excelseg.io.files import read_label_png

    path = tmp_path / "scene.png"
    Image.fromarray(world["scene"].image).save(path)
    app = AppModel(world["clip"], config=world["cfg"], device="cpu", work_dir=tmp_path / "app")
    res = app.run(path, ", ".join(world["names"]), "synthetic", Switches())
    assert res.ok, res.status
    assert np.array_equal(read_label_png(res.label_png), world["want"])
