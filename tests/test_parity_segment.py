"""Numerical parity of segmentation inference (``infer_seg_voc.py``, parity README §4.2 path (e)).

Weights: the kit's random ViT-B/16 and ``ref_heads_seed0.safetensors``, through an excelseg checkpoint
(:func:`excelseg.io.checkpoint.save_checkpoint`) and :meth:`excelseg.Segmenter.from_checkpoint`. Goldens:
``msc_logits_{320,224,384,480}`` (detail images: raw decoder logits of [x, flip x] per scale) and ``msc_pred``
(all 19 images: 4 scales, flip except at scale 1.0, logits averaged at the image size, argmax). Tolerances:
README §6 — logits 5e-4 (``msc_logits_*``), labels ≤ 0.1 % of the pixels per image (``msc_pred``, ``seg_val``).
The CLI is checked to reach the same numbers: ``excelseg segment --checkpoint`` at the kit's 320 against
``msc_pred``, and at another ``--size`` against an oracle assembled from :class:`excelseg.model.ExcelModel`
(whose ``seg_logits`` are parity-tested in ``test_parity_lvc.py``) and a plain loop over scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parity_kit import (
    DETAIL_IMAGES,
    PARITY,
    golden,
    image_names,
    image_path,
    random_clip_weights,
    require_kit,
)

NAMES = image_names()
TOL_LOGITS = 5e-4  # README §6: seg_logits, msc_logits_*
TOL_LABEL_FRAC = 1e-3  # README §6: msc_pred, seg_val — ≤ 0.1 % of the pixels per image
MSC = {320: 1.0, 224: 0.7, 384: 1.2, 480: 1.5}  # input side → scale (parity README §3.3 "msc")


def rgb(name: str) -> np.ndarray:
    from excelseg.io.images import read_image, to_rgb_array

    return to_rgb_array(read_image(image_path(name)))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    require_kit()
    from excelseg import load_clip
    from excelseg.config import PAPER_VOC
    from excelseg.interop import import_reference_heads
    from excelseg.io.checkpoint import save_checkpoint
    from excelseg.vocab import Vocabulary

    clip = load_clip(random_clip_weights(), device="cpu")
    state = import_reference_heads(PARITY / "ref_heads_seed0.safetensors", num_classes=20)
    ckpt = tmp_path_factory.mktemp("ckpt") / "heads.safetensors"
    save_checkpoint(ckpt, state, class_names=Vocabulary.named("voc").names, clip_identity=clip.identity,
                    config=PAPER_VOC, metadata={"vocabulary": "voc"})
    return clip, ckpt


@pytest.fixture(scope="module")
def segmenter(kit):
    from excelseg import Segmenter

    clip, ckpt = kit
    return Segmenter.from_checkpoint(ckpt, clip, device="cpu")


def frac_differ(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a != b).mean())


def check_msc_pred(res, g: dict) -> None:
    """``msc_pred`` (4 scales, flip except at 1.0, logits averaged at the image size) and ``seg_val`` (the
    scale-1.0 logits alone) of one image's :class:`~excelseg.segmenter.SegResult`."""
    assert res.label.shape == g["msc_pred"].shape and res.label.dtype == np.uint8
    assert frac_differ(res.label, g["msc_pred"]) <= TOL_LABEL_FRAC
    assert frac_differ(res.label_single_scale, g["seg_val"]) <= TOL_LABEL_FRAC


@pytest.mark.parametrize("name", DETAIL_IMAGES)
def test_msc_logits(segmenter, name):
    """Raw decoder logits of [x, flip x] at the four msc input sizes (README §4.2 ``msc_logits_*``), through
    the msc path the predictions use (flip not computed at scale 1.0: VOC quirk; that one is run here), and this
    image's ``msc_pred`` from the same forwards."""
    from excelseg.preprocess import network_input

    g = golden(name)
    per_scale = segmenter.scale_logits([rgb(name)])[0]
    assert [f is None for _, f in per_scale] == [True, False, False, False]
    check_msc_pred(segmenter._finish(rgb(name), per_scale, False, True), g)
    x = network_input(rgb(name), (320, 320), "imagenet").flip(-1)
    per_scale = [(per_scale[0][0], segmenter.head_logits(x[None])[0]), *per_scale[1:]]
    for (plain, flipped), side in zip(per_scale, MSC):
        ref = torch.from_numpy(g[f"msc_logits_{side}"]).double()
        err = float((torch.stack([plain, flipped]).double() - ref).abs().max())
        assert err <= TOL_LOGITS, f"msc_logits_{side}: {err:.2e}"


@pytest.mark.parametrize("name", DETAIL_IMAGES)
def test_aggregation_of_golden_logits(name):
    """The aggregation alone, fed the golden per-scale logits, gives ``msc_pred`` (README §5.10: the reference's
    own recomputation differs in 0 px); flipping at scale 1.0 too (the COCO script) is a different rule."""
    require_kit()
    from excelseg.segmenter import aggregate_logits

    g = golden(name)
    size = g["msc_pred"].shape
    per_scale = [(torch.from_numpy(g[f"msc_logits_{s}"][0]),
                  None if s == 320 else torch.from_numpy(g[f"msc_logits_{s}"][1])) for s in MSC]
    pred = aggregate_logits(per_scale, size).argmax(0).numpy().astype(np.uint8)
    assert frac_differ(pred, g["msc_pred"]) <= TOL_LABEL_FRAC
    every = [(torch.from_numpy(g[f"msc_logits_{s}"][0]), torch.from_numpy(g[f"msc_logits_{s}"][1])) for s in MSC]
    logits_q, logits_e = aggregate_logits(per_scale, size), aggregate_logits(every, size)
    assert float((logits_q - logits_e).abs().max()) > 100 * TOL_LOGITS  # the quirk is visible in the logits


@pytest.mark.parametrize("name", [n for n in NAMES if n not in DETAIL_IMAGES])
def test_msc_pred(segmenter, name):
    """``msc_pred`` and ``seg_val`` of the other 17 images (the 2 detail images: :func:`test_msc_logits`)."""
    check_msc_pred(segmenter.predict(rgb(name), single_scale=True), golden(name))


def _oracle_labels(clip, ckpt, image: np.ndarray, size: int) -> np.ndarray:
    """Segmentation at base ``size`` assembled from ExcelModel's forward (reference geometry: square inputs
    ``int(size·s)``, pos-embedding via the base grid, flip averaged at s ≠ 1, logits averaged at image size)."""
    from dataclasses import replace

    from excelseg.config import PAPER_VOC
    from excelseg.io.checkpoint import load_checkpoint
    from excelseg.model import ExcelModel
    from excelseg.preprocess import network_input

    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(size, size)))
    heads = load_checkpoint(ckpt).heads()
    text = torch.zeros(45, 512)  # the decoder does not read text features
    model = ExcelModel(clip.model.visual, text, 20, cfg, heads).eval()
    h, w = image.shape[:2]
    total = torch.zeros(21, h, w, dtype=torch.float64)
    for s in (1.0, 0.7, 1.2, 1.5):
        side = int(size * s)
        x = network_input(image, (side, side), "imagenet")
        with torch.no_grad():
            logits = model(torch.stack([x, x.flip(-1)])).seg_logits
        up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).double()
        total += up[0] if s == 1.0 else (up[0] + up[1].flip(-1)) / 2
    return total.argmax(0).numpy().astype(np.uint8)


def test_cli_segment_reaches_msc_pred_and_other_sizes(kit, tmp_path, capsys):
    """``excelseg segment --checkpoint`` on a detail image: ``msc_pred`` at 320; at ``--size 192`` (inputs
    134/192/230/288, any grid) the ExcelModel oracle (label tolerance as README §6). Every kit image goes through
    the same Segmenter in test_msc_pred / test_msc_logits; this checks that the command reaches it."""
    from PIL import Image

    from excelseg.cli import main

    clip, ckpt = kit
    images = [str(image_path(n)) for n in DETAIL_IMAGES[:1]]  # the library path checks every image
    weights = str(random_clip_weights())
    out = tmp_path / "seg"
    assert main(["segment", *images, "--checkpoint", str(ckpt), "--clip", weights, "--out-dir", str(out),
                 "--device", "cpu"]) == 0
    assert "1 written" in capsys.readouterr().out
    for name in DETAIL_IMAGES[:1]:
        label = Image.open(out / f"{name}.png")
        assert label.mode == "P"
        frac = frac_differ(np.array(label), golden(name)["msc_pred"])
        assert frac <= TOL_LABEL_FRAC
    out_other = tmp_path / "seg192"
    assert main(["segment", images[0], "--checkpoint", str(ckpt), "--clip", weights, "--out-dir", str(out_other),
                 "--device", "cpu", "--size", "192"]) == 0
    for name in DETAIL_IMAGES[:1]:
        ours = np.array(Image.open(out_other / f"{name}.png"))
        frac = frac_differ(ours, _oracle_labels(clip, ckpt, rgb(name), 192))
        assert frac <= TOL_LABEL_FRAC
        # and the size matters: the 320 labels are not the 192 ones
        assert frac_differ(ours, np.array(Image.open(out / f"{name}.png"))) > 10 * TOL_LABEL_FRAC


# ---- excelseg cam --checkpoint: LVC pseudo-labels (infer_lam --training_free false, README §4.2 path (b)) --------


def _lvc_oracle(clip, ckpt, image: np.ndarray, size: int, cls_idx: np.ndarray) -> np.ndarray:
    """``pseudo_lvc`` at base ``size`` assembled from ExcelModel (the path test_parity_lvc.py checks against the
    goldens): [x, flip x] forward, LVC CAMs with the pair's shift, max with the mirror, P of x alone,
    P-guided affinity, box mask τ 0.79, refinement, PAR on the normalised input."""
    from dataclasses import replace

    from excelseg.config import PAPER_VOC
    from excelseg.io.checkpoint import load_checkpoint
    from excelseg.lvc import learned_affinity, p_guided_affinity
    from excelseg.model import ExcelModel
    from excelseg.predictor import CamPredictor
    from excelseg.preprocess import network_input
    from excelseg.pseudo import labels_from_cams
    from excelseg.refine import box_mask, flip_max_cams, refine_cams, transition_matrix
    from excelseg.vocab import Vocabulary
    from parity_kit import REF_BANK

    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(size, size)))
    text = CamPredictor(clip, vocabulary="voc", bank=REF_BANK, config=cfg, device="cpu").text_features(
        Vocabulary.named("voc"))
    model = ExcelModel(clip.model.visual, text, 20, cfg, load_checkpoint(ckpt).heads()).eval()
    x = network_input(image, (size, size), "imagenet")
    idx = torch.from_numpy(cls_idx)
    with torch.no_grad():
        out = model(torch.stack([x, x.flip(-1)]))
        c = model.lvc_cams(out)
        cams = flip_max_cams(c[:1], c[1:])[0][idx]
        aff, _, _ = p_guided_affinity(out.attn[:1], learned_affinity(out.adapter_fts[:1]))
        refined = refine_cams(cams[None], transition_matrix(aff), box_mask(cams[None], 0.79))[0]
        _, label = labels_from_cams(refined, x, image.shape[:2], values=[0] + (idx + 1).tolist())
    return label.numpy()


def test_cli_cam_checkpoint_reaches_pseudo_lvc(kit, tmp_path, capsys):
    """``excelseg cam --checkpoint`` on a detail image: ``pseudo_lvc`` at 320 (README §6: ≤ 0.1 % of the pixels)
    and not the static labels; at ``--size 192`` the ExcelModel oracle."""
    from PIL import Image

    from excelseg.cli import main
    from excelseg.vocab import Vocabulary
    from parity_kit import REF_BANK

    clip, ckpt = kit
    names = Vocabulary.named("voc").names
    weights = str(random_clip_weights())
    for name in DETAIL_IMAGES[:1]:  # every image's pseudo_lvc: test_parity_lvc.py (the library path)
        g = golden(name)
        classes = ",".join(names[i] for i in g["cls_idx"])
        common = [str(image_path(name)), "--checkpoint", str(ckpt), "--clip", weights, "--bank", str(REF_BANK),
                  "--vocabulary", "voc", "--classes", classes, "--device", "cpu"]
        assert main(["cam", *common, "--out-dir", str(tmp_path / "c320")]) == 0
        ours = np.array(Image.open(tmp_path / "c320" / f"{name}.png"))
        frac = frac_differ(ours, g["pseudo_lvc"])
        assert frac <= TOL_LABEL_FRAC
        assert frac_differ(ours, g["pseudo_static"]) > 10 * TOL_LABEL_FRAC  # the checkpoint changes the labels
        assert main(["cam", *common, "--out-dir", str(tmp_path / "c192"), "--size", "192"]) == 0
        ours = np.array(Image.open(tmp_path / "c192" / f"{name}.png"))
        frac = frac_differ(ours, _lvc_oracle(clip, ckpt, rgb(name), 192, g["cls_idx"]))
        assert frac <= TOL_LABEL_FRAC
    capsys.readouterr()
