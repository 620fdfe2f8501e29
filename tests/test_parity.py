"""Numerical parity with the authors' reference code — training-free path (parity README path (a), §6 tolerances).

Weights: the kit's deterministic random ViT-B/16 (regenerated with ``make_random_clip.py --seed 0`` and cached
outside the repository), loaded through excelseg's own ``load_clip``. Every array is compared with the golden
output of the reference implementation; tolerances are the README's recommended ones, never loosened.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from numerics import GUARD_MARGIN
from parity_kit import (
    DETAIL_IMAGES,
    GOLDEN,
    REF_BANK,
    golden,
    gt_mask,
    image_names,
    image_path,
    random_clip_weights,
    require_kit,
)

NAMES = image_names()
TOL_PAR = 1e-5  # README §6: par.out
# under pytest-xdist (`make test`), test_pseudo_label_metrics reuses the per-image passes: keep them on one worker
pytestmark = pytest.mark.xdist_group("parity_free")


@pytest.fixture(scope="module")
def predictor():
    require_kit()
    from excelseg import CamPredictor, load_clip
    from excelseg.config import PAPER_VOC

    clip = load_clip(random_clip_weights(), device="cpu")
    return CamPredictor(clip, vocabulary="voc", bank=REF_BANK, config=PAPER_VOC, device="cpu")


@pytest.fixture(scope="module")
def run(predictor):
    """``run(name)`` → (state, result for the golden's present classes); computed once per image, whichever test
    asks first, so every test works alone and in any order."""
    from excelseg.io.images import read_image, to_rgb_array

    cache: dict = {}

    def _run(name: str):
        if name not in cache:
            rgb = to_rgb_array(read_image(image_path(name)))
            state = predictor.encode_batch([rgb])[0]
            cls_idx = golden(name)["cls_idx"]
            cache[name] = state, predictor.predict_state(state, [predictor.vocabulary.names[i] for i in cls_idx])
        return cache[name]

    return _run


def check_box_mask(box: torch.Tensor, raw: torch.Tensor, g: dict, threshold: float) -> torch.Tensor:
    """Box masks must equal the golden exactly, with the one exception the kit README's quantisation margins
    allow (§6): the box is computed from ``floor(255·cam)`` levels, and a CAM within the 2e-4 tolerance of a level
    step may land on the other side on another CPU. So a differing box is accepted only if (1) some uint8 level of
    our CAMs differs from the golden CAMs' level, (2) every differing level belongs to a golden value within
    255·2e-4 of a step, and (3) the box algorithm applied to the golden CAMs reproduces the golden box exactly.
    Returns the box to continue the chain with (the golden one in the accepted-difference case)."""
    from excelseg.refine import box_mask

    expected = g["boxmask_static"]
    if np.array_equal(box.numpy().astype(np.uint8), expected):
        return box
    ref = torch.from_numpy(g["cam_static"]).T.reshape(-1, *raw.shape[-2:])[torch.from_numpy(g["cls_idx"])]
    ref255 = ref.double() * 255
    ours_lv, ref_lv = torch.floor(raw.double() * 255), torch.floor(ref255)
    differ = ours_lv != ref_lv
    assert differ.any(), "box mask differs although every uint8 CAM level equals the golden's"
    step_distance = (ref255 - ref255.round()).abs()
    assert bool((step_distance[differ] <= 255 * 2e-4).all()), "a CAM level moved by more than the 2e-4 tolerance"
    assert np.array_equal(box_mask(ref[None], threshold)[0].numpy().astype(np.uint8), expected)
    return torch.from_numpy(expected).bool()


def max_abs(a, b) -> float:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    return float(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_text_features_and_tse(predictor):
    from excelseg.text import build_prompts, enrich

    g = np.load(GOLDEN / "text.npz")
    vocab = predictor.vocabulary
    prompts = build_prompts(vocab, predictor.config.text.template)
    assert prompts == [str(p) for p in g["prompts"]]
    assert np.array_equal(predictor.clip.tokenizer(prompts).numpy(), g["tokens"])
    plain = predictor.text_encoder.encode(prompts)
    assert max_abs(plain, g["text_feats"]) <= 1e-5
    _, logits, weights = enrich(plain[:20], predictor.bank.attributes, 0.9, 1.0, 1.0)
    assert max_abs(logits, g["tse_logits"]) <= 1e-5
    assert max_abs(weights, g["tse_weights"]) <= 1e-5
    assert int((weights == 0).sum(dim=1).unique().item()) == 11  # lowest floor(0.1·112) dropped
    assert max_abs(predictor.text_features(vocab), g["text_attr"]) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_par_alone(backend):
    require_kit()
    from excelseg import _native as native
    from excelseg.par import par

    if backend == "native" and native.par_library() is None:
        pytest.skip("the native PAR kernels could not be built here (no C compiler?)")
    g = np.load(GOLDEN / "par.npz")
    for iters in (20, 19, 21):
        out = par(torch.from_numpy(g["img"]), torch.from_numpy(g["masks"]), iters=iters,
                  dilations=(1, 2, 4, 8, 12, 24), backend=backend)
        if iters == 20:
            assert max_abs(out, g["out"]) <= TOL_PAR
        else:  # one iteration fewer or more is far outside the tolerance (measured 3.5e-2 / 3.0e-2)
            assert max_abs(out, g["out"]) > GUARD_MARGIN * TOL_PAR, iters


@pytest.mark.parametrize("name", NAMES)
def test_training_free_image(predictor, run, name):
    from excelseg.refine import box_mask, refine_cams

    g = golden(name)
    state, result = run(name)

    # the CAMs of all 20 VOC classes from the pipeline's CAM stage (predict_state(state, None) gives the same maps
    # and then a 21-channel PAR whose labels this test does not read: ~8 s per image on a slow host)
    vocab = predictor.vocabulary
    all_cams = predictor.model.image_cams([state], predictor.text_features(vocab), vocab.num_classes,
                                          [list(range(vocab.num_classes))])[0]
    assert max_abs(all_cams.reshape(20, 400).T, g["cam_static"]) <= 2e-4
    raw = torch.from_numpy(result.raw_cams)
    threshold = predictor.config.refine.box_threshold
    box = check_box_mask(box_mask(raw[None], threshold)[0], raw, g, threshold)
    refined = refine_cams(raw[None], state.trans[None], box[None])[0]
    assert max_abs(refined, g["refined_static"]) <= 2e-5

    label = result.pseudo_label
    assert label.shape == g["pseudo_static"].shape == tuple(result.image_size)
    differing = float((label != g["pseudo_static"]).mean())
    assert differing <= 1e-3, f"{differing:.2%} of pixels differ"

    if name in DETAIL_IMAGES:
        assert max_abs(state.net_input, g["input"]) <= 1e-5
        cfg = predictor.config
        out = predictor.encoder(state.net_input[None], predictor.encoder.last_blocks(cfg.cam.svc_last_blocks),
                                predictor.encoder.last_blocks(cfg.refine.affinity_layers))
        assert out.svc_blocks == (7, 8, 9, 10, 11)
        assert max_abs(out.features[0], g["svc_feats"]) <= 5e-4
        # reference returns head-mean maps for ordinary blocks and head-sum maps for the surgery blocks
        ref_scale = torch.tensor([1.0] + [12.0] * 5).view(6, 1, 1)
        assert max_abs(out.attn[0] * ref_scale, g["attn_last6"]) <= 2e-4
        trans_ref = torch.from_numpy(g["trans_static"])
        assert max_abs(state.trans, trans_ref) <= 2e-6
        assert max_abs(state.trans, trans_ref) / float(trans_ref.abs().max()) <= 1e-3
        tokens = np.load(GOLDEN / f"{name}_tokens.npz")["tokens"]
        # clean layers of the kit's token dump (README §5.4: 6–10 are aliased by the reference)
        for layer in (0, 1, 2, 3, 4, 5, 11):
            rel = max_abs(out.tokens[layer][0], tokens[layer]) / float(np.abs(tokens[layer]).max())
            assert rel <= 1e-4, f"layer {layer}: rel {rel:.2e}"
        # the kit's slot 6 is the final SVC stream (pre-ln_post, CLS replaced)
        rel = max_abs(out.svc_stream[0], tokens[6]) / float(np.abs(tokens[6]).max())
        assert rel <= 1e-4


def test_pseudo_label_metrics(run):
    """metrics.json's pseudo_static scores, recomputed by excelseg's evaluator from excelseg's labels."""
    from excelseg.metrics import SegmentationMetric

    ref = json.loads((GOLDEN / "metrics.json").read_text())["pseudo_static"]
    metric = SegmentationMetric(21)
    for name in NAMES:
        metric.update(run(name)[1].pseudo_label, gt_mask(name))
    res = metric.compute()
    assert abs(res["miou"] - ref["miou"]) <= 1e-3
    iou = np.array(res["iou"], dtype=np.float64)
    ref_iou = np.array([np.nan if v is None else v for v in ref["iou"]], dtype=np.float64)
    assert np.array_equal(np.isnan(iou), np.isnan(ref_iou))
    assert np.nanmax(np.abs(iou - ref_iou)) <= 1e-3


# bf16 CLIP forward vs fp32 on the first five kit images (pixel-weighted agreement of pseudo-labels): measured
# 89.1 % on this machine (AMD EPYC, AVX-512 bf16; python benchmarks/precision_agreement.py gives per-image figures
# — random weights make many near-ties, real weights agree more). Floor 80 %: a 9-point margin for CPUs that
# emulate bf16 with another accumulation order; a broken mixed-precision path (e.g. bf16 leaking into PAR or the
# refinement) lands far lower or fails outright.
BF16_AGREEMENT_FLOOR = 0.80


def test_bf16_forward_agrees_with_fp32(predictor, run):
    from excelseg import CamPredictor
    from excelseg.io.images import read_image, to_rgb_array

    low = CamPredictor(predictor.clip, vocabulary="voc", bank=REF_BANK, config=predictor.config, device="cpu",
                       precision="bf16")
    same = total = 0
    for name in NAMES[:5]:
        ref = run(name)[1]
        result = low.set_image(to_rgb_array(read_image(image_path(name)))).predict(ref.class_names)
        assert result.raw_cams.dtype == np.float32  # only the CLIP forward runs in bf16
        same += int((result.pseudo_label == ref.pseudo_label).sum())
        total += ref.pseudo_label.size
    assert same / total >= BF16_AGREEMENT_FLOOR, f"bf16 agreement {same / total:.3f}"
