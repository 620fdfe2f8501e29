"""Contrastive CLIP training on generated scenes (excelseg.clip_train) and the shipped ``synthetic`` weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import excelseg
from excelseg.config import IMAGENET_MEAN, IMAGENET_STD, PAPER_VOC
from excelseg.synthetic import CLASS_NAMES, SceneGenerator
from excelseg.synthetic.clip_train import (
    SYNTHETIC_CLIP_CONFIG,
    build_model,
    contrastive_loss,
    images_to_tensor,
    load_init,
    tokenizer_for,
    train_clip,
)
from excelseg.weights import NAMED_WEIGHTS, file_sha256, load_clip

TINY = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 64, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1, "mlp_ratio": 2.0},
}
ASSET = Path(excelseg.__file__).resolve().parent / NAMED_WEIGHTS["synthetic"]
needs_asset = pytest.mark.skipif(not ASSET.is_file(), reason=f"shipped weights absent: {ASSET} "
                                 "(make them with excelseg train-clip)")
MAX_BYTES = 10_000_000


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_contrastive_loss_same_label_sets_are_positives():
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.float32)
    perfect = contrastive_loss(f, f, torch.tensor(100.0), labels)
    assert perfect.isfinite()
    # rows 0 and 1 describe the same classes: swapping their texts costs nothing with label-aware targets
    swapped = contrastive_loss(f, f[[1, 0, 2, 3]], torch.tensor(100.0), labels)
    assert torch.allclose(perfect, swapped, atol=1e-5)
    plain = contrastive_loss(f, f[[1, 0, 2, 3]], torch.tensor(100.0))
    assert plain > perfect


def test_images_are_normalised_like_the_pipeline():
    img = np.full((1, 4, 4, 3), 200, np.uint8)
    x = images_to_tensor(img)
    expected = (200 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[0, :, 0, 0], expected)


def test_steps_on_a_fixed_batch_reduce_the_loss():
    torch.manual_seed(0)
    model = build_model(TINY, seed=0).train()
    tok = tokenizer_for(TINY)
    images, _, labels, captions = SceneGenerator(32, seed=5).batch(0, 8)
    x, t, y = images_to_tensor(images), tok(captions), torch.from_numpy(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = contrastive_loss(torch.nn.functional.normalize(model.encode_image(x), dim=-1),
                                torch.nn.functional.normalize(model.encode_text(t), dim=-1),
                                model.logit_scale.exp(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_train_clip_is_deterministic_and_changes_parameters():
    init = _params(build_model(TINY, seed=3))
    runs = [train_clip(None, minutes=None, steps=2, batch=6, seed=3, threads=None, eval_scenes=0, config=TINY,
                       log_every=1) for _ in range(2)]
    a, b = (_params(r["model"]) for r in runs)
    assert runs[0]["steps"] == 2 and np.isfinite(runs[0]["final_loss"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)
    other = _params(train_clip(None, minutes=None, steps=2, batch=6, seed=4, threads=None, eval_scenes=0,
                               config=TINY)["model"])
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_schedule_steps_stop_early_on_a_longer_schedule_and_init_continues(tmp_path):
    """--steps M --schedule-steps N: the learning rates of the first M steps of an N-step run (what re-makes a
    run that --minutes stopped); --init continues from saved weights and records where they came from."""
    full = train_clip(None, minutes=None, steps=4, batch=4, seed=1, threads=None, eval_scenes=0, config=TINY,
                      log_every=1, captions="mixed", hard_negatives=0.5)
    part = train_clip(tmp_path / "part.safetensors", minutes=None, steps=2, schedule_steps=4, batch=4, seed=1,
                      threads=None, eval_scenes=0, config=TINY, log_every=1, captions="mixed", hard_negatives=0.5)
    assert [h["lr"] for h in part["history"]] == [h["lr"] for h in full["history"][:2]]
    assert [h["loss"] for h in part["history"]] == [h["loss"] for h in full["history"][:2]]
    assert part["schedule_steps"] == 4 and part["captions"] == "mixed"
    model, config, record = load_init(tmp_path / "part.safetensors")
    assert config == TINY and record["sha256"] == part["sha256"] and record["steps"] == 2
    more = train_clip(None, minutes=None, steps=1, batch=4, seed=2, threads=None, eval_scenes=0, config=config,
                      model=model, init=record)
    assert more["init"]["sha256"] == part["sha256"]


def test_saved_file_loads_through_load_clip(tmp_path):
    out = tmp_path / "tiny_clip.safetensors"
    rec = train_clip(out, minutes=None, steps=1, batch=4, seed=0, threads=None, eval_scenes=8, config=TINY,
                     command="test")
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["sha256"] == file_sha256(out) == rec["sha256"]
    assert info["steps"] == 1 and info["command"] == "test" and 0.0 <= info["heldout_accuracy"] <= 1.0
    clip = load_clip(str(out))
    assert clip.identity == f"sha256:{info['sha256']}"
    assert clip.image_size == (32, 32)
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())
    trained = rec["model"].state_dict()
    for k, v in clip.model.state_dict().items():  # fp16 storage: equal up to half precision
        assert torch.allclose(v, trained[k].float(), atol=1e-2, rtol=1e-2), k


@needs_asset
def test_shipped_weights_file_and_json():
    info = json.loads(ASSET.with_suffix(".json").read_text())
    assert ASSET.stat().st_size <= MAX_BYTES
    assert info["sha256"] == file_sha256(ASSET)
    assert info["model_cfg"] == SYNTHETIC_CLIP_CONFIG
    assert info["steps"] > 0 and np.isfinite(info["final_loss"])


@needs_asset
def test_shipped_weights_load_by_name_and_path():
    clip = load_clip("synthetic")
    sha = json.loads(ASSET.with_suffix(".json").read_text())["sha256"]
    assert clip.name == "synthetic" and clip.identity == f"sha256:{sha}"
    vis = SYNTHETIC_CLIP_CONFIG["vision_cfg"]
    assert clip.image_size == (vis["image_size"],) * 2
    assert clip.model.visual.patch_size == (vis["patch_size"],) * 2
    assert len(clip.model.visual.transformer.resblocks) == vis["layers"] >= 6
    assert clip.model.context_length == SYNTHETIC_CLIP_CONFIG["text_cfg"]["context_length"]
    assert clip.tokenizer(["a photo of a red disc"]).shape == (1, clip.model.context_length)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in clip.model.parameters())
    by_path = load_clip(str(ASSET))
    assert by_path.identity == clip.identity


@needs_asset
def test_training_free_pipeline_runs_on_shipped_weights():
    from excelseg.predictor import CamPredictor

    clip = load_clip("synthetic")
    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=clip.image_size))
    pred = CamPredictor(clip, vocabulary=list(CLASS_NAMES), config=cfg, device="cpu")
    scene = SceneGenerator(clip.image_size[0], seed=123).scene(0)
    names = [CLASS_NAMES[i] for i in scene.labels]
    res = pred.set_image(scene.image).predict(names)
    assert res.pseudo_label.shape == scene.mask.shape
    assert set(np.unique(res.pseudo_label)) <= {0, *(i + 1 for i in scene.labels)}
    assert res.grid_cams.shape[0] == len(names)
