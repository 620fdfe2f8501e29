"""Documented sizes of segmentation (issue 24, item 8; docs/segmentation.md "Deviations from the reference
scripts"), through :class:`excelseg.Segmenter` and ``excelseg segment``:

* logits are aggregated at most 2048 px on the longer side (``MAX_WORK_SIDE``), and the label of a larger image
  is the argmax of their bilinear upsampling to the image size;
* images over 4096 px (longer side) are first box-shrunk by an integer factor (``ceil(side / 4096)``) before the
  square network inputs are made; the label keeps the image size;
* the reduced (COCO) logits are ``round(0.2·H) × round(0.2·W)``.

Oracles are independent of the implementation: bilinear resizing (align_corners=False, the half-pixel rule) as
explicit float64 interpolation matrices, box shrinking as numpy block means, the multi-scale + flip mean written
out over the per-scale decoder logits (``Segmenter.head_logits``, one view per forward). The tiny 6-block CLIP
and small heads of ``test_segment.py`` keep each test around a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.cli import main
from excelseg.config import IMAGENET_MEAN, IMAGENET_STD, apply_overrides
from excelseg.io.checkpoint import save_checkpoint
from numerics import F32_REL, GUARD_MARGIN, assert_rel_close, rel_err
from test_segment import CFG, CLASSES, tiny_heads
from tiny_clip import save_tiny

LABEL_TIES = 1e-3  # labels may differ from the float64 oracle's only at near-ties: ≤ 0.1 % of the pixels


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("w") / "tiny.pt", layers=6, patch=16, image=64, heads=1)


@pytest.fixture(scope="module")
def clip(weights):
    from excelseg import load_clip

    return load_clip(weights, device="cpu")


def centred_heads(clip):
    """The tiny heads with each class's logit standardised (classifier rescaled, bias shifted) over the patches of
    a banded image, so the labels below hold several classes (the raw random heads predict one class everywhere:
    a label check would test nothing)."""
    from excelseg import Segmenter
    from excelseg.preprocess import network_input

    heads = tiny_heads()
    logits = Segmenter(clip, heads, CLASSES, config=CFG, device="cpu").head_logits(
        network_input(bands(64, 64), (64, 64))[None])
    mean, std = logits.mean(dim=(0, 2, 3)), logits.std(dim=(0, 2, 3))
    cls = heads.decoder.classifier
    with torch.no_grad():
        cls.weight.div_(std.view(-1, 1, 1, 1))
        cls.bias.sub_(mean).div_(std)
    return heads


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, clip):
    path = tmp_path_factory.mktemp("c") / "heads.safetensors"
    save_checkpoint(path, centred_heads(clip).state_dict(), class_names=CLASSES, clip_identity=clip.identity,
                    config=CFG)
    return path


def segmenter(ckpt, clip, *overrides: str):
    from excelseg import Segmenter

    return Segmenter.from_checkpoint(ckpt, clip, device="cpu", config=apply_overrides(CFG, list(overrides)))


def bands(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: three vertical bands (blue, grey, black) plus noise; with :func:`centred_heads` each band
    gets its own label."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.int64)
    edges = np.linspace(0, w, 4).round().astype(int)
    for colour, a, b in zip([(30, 60, 210), (128, 128, 128), (0, 0, 0)], edges[:-1], edges[1:]):
        img[:, a:b] = colour
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of 1-D bilinear resampling, align_corners=False: output ``i`` reads source
    ``(i + 0.5)·n_in/n_out − 0.5`` (clamped at 0), between its floor and the next sample (clamped at the edge)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) → (C, *size) float64 bilinear resampling (separable: rows, then columns)."""
    ry, rx = bilinear_matrix(x.shape[1], size[0]), bilinear_matrix(x.shape[2], size[1])
    return ry @ np.asarray(x, np.float64) @ rx.T


def msc_oracle(seg, rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The multi-scale + flip aggregation of docs/segmentation.md written out: for each scale ``s`` the square
    ``int(cam.size·s)`` input, its decoder logits (and those of its mirror, flipped back after resizing, except at
    scale 1.0: the VOC preset's quirk), each resized to ``size``; the mean over scales. (C + 1, *size) float64."""
    from excelseg.preprocess import network_input

    cfg = seg.config
    assert cfg.segment.skip_flip_at_base and cfg.segment.flip  # the VOC preset these tests use
    total = 0.0
    for s in cfg.segment.scales:
        n = int(cfg.cam.size[0] * s)
        x = network_input(rgb, (n, n), cfg.cam.normalization)
        plain = resize(seg.head_logits(x[None])[0].double().numpy(), size)
        if s == 1.0:
            total = total + plain
        else:
            mirror = resize(seg.head_logits(x.flip(-1)[None])[0].double().numpy(), size)[:, :, ::-1]
            total = total + (plain + mirror) / 2
    return total / len(cfg.segment.scales)


def upsampled_label(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize(logits, size).argmax(0)


def frac_differ(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    return float((a != b).mean())


def test_logits_of_a_wide_image_are_aggregated_at_2048_px(ckpt, clip, weights, tmp_path):
    """A 40×2100 image: the logits are aggregated at 39×2048 (2100 → 2048, so 40·2048/2100 = 39.01 → 39), are
    the mean of the per-scale logits resized to that size, and the 40×2100 label is the argmax of their bilinear
    upsampling. ``excelseg segment --save-logits`` writes the same sizes."""
    seg = segmenter(ckpt, clip)
    rgb = bands(40, 2100)
    res = seg.predict(rgb)
    assert res.image_size == (40, 2100) and res.label.shape == (40, 2100)
    assert tuple(res.logits.shape) == (3, 39, 2048)
    want = msc_oracle(seg, rgb, (39, 2048))
    assert_rel_close(res.logits, want, F32_REL, "aggregated logits at 39×2048")
    assert set(np.unique(res.label)) == {0, 1, 2}  # a label with boundaries: the check below means something
    assert frac_differ(res.label, upsampled_label(want, (40, 2100))) <= LABEL_TIES

    photos = tmp_path / "p"
    photos.mkdir()
    Image.fromarray(rgb).save(photos / "wide.png")
    out = tmp_path / "seg"
    assert main(["segment", str(photos), "--checkpoint", str(ckpt), "--clip", str(weights), "--out-dir",
                 str(out), "--save-logits", "--no-overlay", "--device", "cpu"]) == 0
    label = np.array(Image.open(out / "wide.png"))
    assert label.shape == (40, 2100) and frac_differ(label, res.label) <= LABEL_TIES
    with np.load(out / "wide_logits.npz") as z:
        assert z["logits"].shape == (3, 39, 2048) and tuple(z["size"]) == (40, 2100)


def test_images_over_4096_px_are_box_shrunk_before_the_network_inputs(ckpt, clip):
    """A 40×4104 image is shrunk by ``ceil(4104/4096) = 2`` (2×2 box means) to 20×2052 before the square
    inputs are resized from it: a hook on the CLIP's patch embedding sees every view's input, equal to the
    resizing of the shrunk image (float64 oracle) and far from that of the full-size image. The label keeps
    the image size (40×4104), the logits are aggregated at 20×2048 (40·2048/4104 = 19.96 → 20)."""
    rng = np.random.default_rng(1)
    mean = rng.integers(30, 226, (20, 2052, 3))
    d = rng.integers(-25, 26, (20, 2052, 3))
    rgb = np.zeros((40, 4104, 3), np.int64)  # each 2×2 block: m, m + d / m − d, m: block mean m exactly
    rgb[0::2, 0::2], rgb[0::2, 1::2], rgb[1::2, 0::2], rgb[1::2, 1::2] = mean, mean + d, mean - d, mean
    rgb = rgb.astype(np.uint8)
    shrunk = rgb.astype(np.float64).reshape(20, 2, 2052, 2, 3).mean(axis=(1, 3))
    assert np.array_equal(shrunk, mean)

    seg = segmenter(ckpt, clip)
    assert seg.config.cam.normalization == "imagenet"
    seen = []
    hook = seg.model.encoder.visual.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        res = seg.predict(rgb)
    finally:
        hook.remove()
    assert res.label.shape == (40, 4104) and tuple(res.logits.shape) == (3, 20, 2048)
    # the sizes the model saw: one square input per scale (mirror in the same batch, none at scale 1.0)
    assert sorted(tuple(x.shape) for x in seen) == [(1, 3, 64, 64), (2, 3, 44, 44), (2, 3, 76, 76), (2, 3, 96, 96)]
    mu, sd = (np.array(v).reshape(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    for x in seen:
        n = x.shape[-1]
        want = (resize(shrunk.transpose(2, 0, 1), (n, n)) - mu) / sd
        unshrunk = (resize(rgb.astype(np.float64).transpose(2, 0, 1), (n, n)) - mu) / sd
        assert_rel_close(x[0], want, F32_REL, f"{n}-px input from the shrunk image")
        assert rel_err(unshrunk, want) > GUARD_MARGIN * F32_REL  # the shrink is visible at this size
        if x.shape[0] == 2:
            assert_rel_close(x[1], want[:, :, ::-1], F32_REL, f"{n}-px mirrored input")


def test_reduced_logits_are_round_of_a_fifth_of_the_image_size(ckpt, clip, weights, tmp_path):
    """``segment.logits_scale=0.2`` (the COCO preset) on a 38×41 image: logits at round(7.6) × round(8.2) = 8×8
    (int() would give 7 rows, ceil() 9 columns), equal to the multi-scale mean resized straight to 8×8; the
    label is 38×41, the argmax of their upsampling. ``excelseg segment`` with the same override writes them."""
    assert (round(0.2 * 38), math.floor(0.2 * 38), round(0.2 * 41), math.ceil(0.2 * 41)) == (8, 7, 8, 9)
    seg = segmenter(ckpt, clip, "segment.logits_scale=0.2")
    rgb = bands(38, 41, seed=2)
    res = seg.predict(rgb)
    assert tuple(res.logits.shape) == (3, 8, 8) and res.label.shape == (38, 41)
    want = msc_oracle(seg, rgb, (8, 8))
    assert_rel_close(res.logits, want, F32_REL, "logits at 8×8")
    assert set(np.unique(res.label)) == {0, 1, 2}
    assert frac_differ(res.label, upsampled_label(want, (38, 41))) <= LABEL_TIES

    photos = tmp_path / "p"
    photos.mkdir()
    Image.fromarray(rgb).save(photos / "small.png")
    out = tmp_path / "seg"
    assert main(["segment", str(photos), "segment.logits_scale=0.2", "--checkpoint", str(ckpt), "--clip",
                 str(weights), "--out-dir", str(out), "--save-logits", "--no-overlay", "--device", "cpu"]) == 0
    assert np.array(Image.open(out / "small.png")).shape == (38, 41)
    with np.load(out / "small_logits.npz") as z:
        assert z["logits"].shape == (3, 8, 8)
        assert_rel_close(z["logits"].astype(np.float64), want, 2 ** -10, "float16 logits file")


def test_the_oracle_resize_is_torch_bilinear():
    """The oracle's interpolation matrices reproduce F.interpolate (bilinear, align_corners=False) up and down,
    so the tests above compare against the same resampling rule, written independently."""
    x = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for size in ((13, 4), (3, 20), (5, 9)):
        ref = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        assert_rel_close(resize(x.numpy(), size), ref, 1e-12, f"resize to {size}")
