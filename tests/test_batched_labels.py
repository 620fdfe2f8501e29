"""The pseudo-label stage as batched device work (issue 22): PAR's launch-light ``gather`` backend against the
float64 oracle, and operation counts of box masks, PAR and the whole stage that do not grow with the batch size or
the number of classes (EXCEL_SPEC §3.3–§3.4). Operations are counted as aten calls (a ``TorchDispatchMode``), what
``benchmarks/gpu_suite.py --device cpu --count-ops`` reports per image.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from excelseg import par as par_mod
from excelseg.par import PAR_DILATIONS, par
from excelseg.pseudo import present_classes, pseudo_labels, select_classes
from excelseg.refine import box_mask
from numerics import F32_REL, F64_REL, GUARD_MARGIN, assert_rel_close, rel_err
from test_refine import _par_naive


class _Ops(TorchDispatchMode):
    """Counts aten calls; ``kernels`` leaves out views (no work on a device)."""

    def __init__(self):
        super().__init__()
        self.calls, self.kernels = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _count(fn, *args, **kwargs) -> _Ops:
    """Ops of ``fn(*args, **kwargs)`` after one warm-up call (which fills per-process caches, e.g. PAR's
    positional weights)."""
    with torch.no_grad():
        fn(*args, **kwargs)
        with _Ops() as ops:
            fn(*args, **kwargs)
    return ops


def _inputs(b, c, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h + 5, w + 3, generator=g, dtype=dtype)
    masks = torch.rand(b, c, h, w, generator=g, dtype=dtype).softmax(1)
    return image, masks


# ----------------------------------------------------------------------------------------------------------------
# PAR, backend "gather"
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b,c,h,w,iters,dilations",
    [
        (1, 3, 37, 53, 20, PAR_DILATIONS),
        (3, 6, 20, 16, 3, PAR_DILATIONS),  # a batch; maps smaller than the largest dilation
        (1, 1, 1, 1, 2, PAR_DILATIONS),  # a single pixel
        (2, 2, 60, 7, 9, (2, 5, 30)),  # other dilations, odd iteration count
    ],
)
def test_gather_par_matches_float64_oracle(b, c, h, w, iters, dilations):
    image, masks = _inputs(b, c, h, w, seed=h * w + c)
    expected = _par_naive(image, masks, iters=iters, dilations=dilations)
    # float64: the same maths with other summation orders (std in one op, the neighbour sums in embedding_bag)
    assert_rel_close(par(image, masks, iters=iters, dilations=dilations, backend="gather"), expected, F64_REL,
                     "gather PAR, float64")
    out = par(image.float(), masks.float(), iters=iters, dilations=dilations, backend="gather")
    assert out.dtype == torch.float32 and out.shape == masks.shape
    assert_rel_close(out, expected, F32_REL, "gather PAR, float32")
    fewer = par(image, masks, iters=iters - 1, dilations=dilations, backend="gather")
    assert rel_err(fewer, expected) > GUARD_MARGIN * F32_REL


def test_gather_par_in_chunks_of_images_is_the_same(monkeypatch):
    image, masks = _inputs(5, 3, 11, 13, seed=2)
    whole = par(image, masks, iters=4, backend="gather")
    monkeypatch.setattr(par_mod, "GATHER_CHUNK", 2 * 3 * 11 * 13 * 48)  # two images per chunk: 3 chunks
    torch.testing.assert_close(par(image, masks, iters=4, backend="gather"), whole, rtol=0, atol=1e-15)
    before = masks.clone()
    assert par(image, masks, iters=3, backend="gather").data_ptr() != masks.data_ptr()
    assert torch.equal(masks, before)


def test_gather_par_ops_do_not_grow_with_batch_or_channels():
    # (from B = 2: for one image some reshapes are views, one op fewer)
    one = _count(par, *_inputs(2, 2, 12, 15, seed=3), iters=20, backend="gather")
    many = _count(par, *_inputs(7, 9, 12, 15, seed=4), iters=20, backend="gather")
    assert one.calls == many.calls
    assert one.kernels <= 20 + 30  # one embedding_bag per iteration + the affinity and set-up (measured 20 + 29)
    # the streamed torch backend issues ~50 ops per iteration
    assert _count(par, *_inputs(1, 2, 12, 15, seed=3), iters=20, backend="torch").kernels > 20 * 48


# ----------------------------------------------------------------------------------------------------------------
# box masks and the whole stage
# ----------------------------------------------------------------------------------------------------------------


def _cams(b, k, seed, h=20, w=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, k, h // 4, w // 4, generator=g)  # smooth blobs, several components per map
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def test_box_mask_ops_do_not_grow_with_maps():
    cams = _cams(1, 1, seed=0)
    one = _count(box_mask, cams, 0.5)
    # 8 images × 5 maps of the same content: the same number of propagation rounds, so the same ops
    many = _count(box_mask, cams.expand(8, 5, -1, -1).contiguous(), 0.5)
    assert one.calls == many.calls
    assert torch.equal(box_mask(cams.expand(8, 5, -1, -1), 0.5), box_mask(cams, 0.5).expand(8, 5, -1, -1))


def _stage(cams, cls, trans, images, size, backend="gather"):
    classes, valid = present_classes(cls)
    return pseudo_labels(select_classes(cams, classes, valid), classes + 1, images, [size] * cams.shape[0],
                         valid=valid, trans=trans, box_threshold=0.6, par_iters=5, par_backend=backend)


def _batch(b, seed, num_classes=6, h=12, w=12, size=(24, 28)):
    g = torch.Generator().manual_seed(seed)
    cams = _cams(b, num_classes, seed, h, w)
    cls = torch.zeros(b, num_classes)
    for i in range(b):
        cls[i, torch.randperm(num_classes, generator=g)[: 1 + i % 3]] = 1  # 1…3 classes: padded to the largest
    trans = torch.rand(b, h * w, h * w, generator=g).softmax(-1)
    return cams, cls, trans, torch.rand(b, 3, *size, generator=g), size


def test_stage_ops_do_not_grow_with_batch_size():
    cams, cls, trans, images, size = _batch(4, seed=1)
    # the same two images repeated: the same propagation rounds in the box masks, so equal counts are expected
    two = _count(_stage, cams[:2], cls[:2], trans[:2], images[:2], size)
    rep = [t[:2].repeat(6, *[1] * (t.dim() - 1)) for t in (cams, cls, trans, images)]
    many = _count(_stage, *rep, size)
    # per image: the outputs are views of the batch's tensors (two slices per image), nothing else is per image
    assert many.kernels == two.kernels
    assert many.total - two.total == 2 * (12 - 2)


def test_batched_stage_equals_image_by_image():
    cams, cls, trans, images, size = _batch(5, seed=2)
    batched = _stage(cams, cls, trans, images, size)
    assert batched.stacked().shape == (5, *size) and batched.stacked().data_ptr() == batched.labels[0].data_ptr()
    for i in range(5):
        alone = _stage(cams[i : i + 1], cls[i : i + 1], trans[i : i + 1], images[i : i + 1], size)
        k = int(cls[i].sum())
        assert batched.refined[i].shape[0] == k and batched.scores[i].shape[0] == k + 1
        torch.testing.assert_close(batched.refined[i], alone.refined[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.scores[i], alone.scores[0], rtol=1e-4, atol=1e-5)
        assert (batched.labels[i] == alone.labels[0]).float().mean() >= 0.999


def test_valid_maps_anywhere_among_the_padding():
    # callers may interleave padding with valid maps: the result equals the same maps given valid-first
    cams, cls, trans, images, size = _batch(3, seed=3)
    classes, valid = present_classes(cls)
    front = select_classes(cams, classes, valid)
    order = torch.flip(torch.arange(front.shape[1]), [0])  # padding first, valid maps in reverse order
    kw = {"trans": trans, "box_threshold": 0.6, "par_iters": 5, "par_backend": "gather"}
    a = pseudo_labels(front, classes + 1, images, [size] * 3, valid=valid, **kw)
    rev = pseudo_labels(front[:, order], (classes + 1)[:, order], images, [size] * 3, valid=valid[:, order], **kw)
    for i in range(3):
        k = int(valid[i].sum())
        torch.testing.assert_close(rev.refined[i], a.refined[i].flip(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rev.scores[i][1:], a.scores[i][1:].flip(0), rtol=1e-5, atol=1e-6)
        assert torch.equal(rev.labels[i], a.labels[i]) and rev.refined[i].shape[0] == k


def test_par_backend_reaches_par_and_backends_agree():
    cams, cls, trans, images, size = _batch(3, seed=4)
    a, b = _stage(cams, cls, trans, images, size, "gather"), _stage(cams, cls, trans, images, size, "torch")
    for sa, sb in zip(a.scores, b.scores):
        assert (sa - sb).abs().max() <= 2e-5 * sb.abs().max()
    with pytest.raises(ValueError, match="backend"):
        _stage(cams, cls, trans, images, size, "nope")


def test_count_ops_proxy_runs_and_leaves_nothing_patched(monkeypatch, capsys):
    """``benchmarks/gpu_suite.py --count-ops`` (in process, small): per-image kernels fall with the batch, the Triton
    path is 1 + 20 launches per batch, and the counter's patches are undone."""
    import importlib.util
    import os
    from pathlib import Path

    import excelseg.pseudo as pseudo_mod

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = (pseudo_mod.box_mask, pseudo_mod.par, par_mod._softmax_band_rows)
    rows = suite.count_ops(torch.device("cpu"), batches=(1, 4), label_size=24, predictor=False)
    assert (pseudo_mod.box_mask, pseudo_mod.par, par_mod._softmax_band_rows) == before
    assert "TRITON_INTERPRET" not in os.environ
    got = {(r["path"].split(",")[0].split(" 24")[0], r["par"], r["batch"]): r for r in rows}
    for backend in ("torch", "gather"):
        one, four = got[("pseudo-label stage", backend, 1)], got[("pseudo-label stage", backend, 4)]
        assert four["kernels_per_image"] < 0.75 * one["kernels_per_image"]  # fixed costs shared by 4 images
    if ("pseudo-label stage", "triton", 1) in got:
        assert "PAR: triton launch 21" in got[("pseudo-label stage", "triton", 1)]["top_ops"]
        tri, gat = got[("pseudo-label stage", "triton", 4)], got[("pseudo-label stage", "gather", 4)]
        assert tri["kernels_per_image"] < gat["kernels_per_image"]
    assert "kernels/img" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# training-free CAMs of a batch (ExcelModel.image_cams)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def views_model():
    """A tiny training-free model with three scales and flip (six views per image, two grids)."""
    from dataclasses import replace

    from excelseg import build_model
    from excelseg.config import PAPER_VOC
    from tiny_clip import tiny_clip

    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(32, 32), scales=(1.0, 0.5, 1.5), flip=True,
                                      svc_last_blocks=2),
                          refine=replace(PAPER_VOC.refine, affinity_layers=3, par_iters=3))
    return build_model(clip=tiny_clip(0), vocabulary="voc", config=cfg, device="cpu")


def _rgbs(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * (i % 3), 3), dtype=np.uint8) for i in range(n)]


def test_batched_cams_equal_image_by_image(views_model):
    m = views_model
    states = m.encode_images(_rgbs(4, seed=5))
    text = m.own_text_features()
    classes = [[3], [0, 7, 19], [], [5, 11]]  # different K per image, one image without classes
    batched = m.image_cams(states, text, 20, classes)
    for st, cls, got in zip(states, classes, batched):
        alone = m.image_cams([st], text, 20, [cls])[0]
        assert got.shape == (len(cls), *st.views[0][1]) == alone.shape
        if cls:
            assert rel_err(got, alone) <= F32_REL
    # and the maps are each class's own: the batch's largest K does not leak padding into a smaller image
    assert not torch.equal(batched[1][0], batched[1][1])


def test_batched_cam_ops_do_not_grow_with_the_batch(views_model):
    m = views_model
    text = m.own_text_features()
    two = m.encode_images(_rgbs(2, seed=6))
    eight = two * 4
    few = _count(m.image_cams, two, text, 20, [[1, 2]] * 2)
    many = _count(m.image_cams, eight, text, 20, [[1, 2]] * 8)
    # per image: a stacking view per view and the output slices; no kernel is per image
    assert many.kernels - few.kernels <= 6 * 2 and many.kernels < few.kernels * 1.5


def test_per_image_results_are_normalised_and_copied_in_one_batch():
    """CamPredictor's per-image results: the min–max normalisation runs once per grid shape over all images' maps
    (bit-identical to image by image: each map is reduced on its own), and the host copies are one per dtype when
    asked (what a GPU does; checked here on CPU tensors), each array equal to its own tensor."""
    import numpy as np

    from excelseg.predictor import _batched, _to_host
    from excelseg.refine import minmax_normalize

    g = torch.Generator().manual_seed(3)
    maps = [torch.rand(k, 6, 7, generator=g) * 5 - 1 for k in (2, 0, 3, 1)] + [torch.rand(2, 4, 4, generator=g)]
    got = _batched(minmax_normalize, maps)
    for m, out in zip(maps, got):
        assert out.shape == m.shape and torch.equal(out, minmax_normalize(m))
    few, many = _count(_batched, minmax_normalize, maps[:2]), _count(_batched, minmax_normalize, maps[:2] * 8)
    assert many.kernels == few.kernels  # one cat + one normalisation per shape, whatever the number of images
    tensors = [*maps, torch.arange(12, dtype=torch.uint8).view(3, 4), torch.zeros(0, 5)]
    for one_copy in (True, False):
        for t, a in zip(tensors, _to_host(tensors, one_copy=one_copy)):
            assert isinstance(a, np.ndarray) and a.shape == tuple(t.shape) and a.dtype == t.numpy().dtype
            assert np.array_equal(a, t.numpy())


def test_pad_maps_puts_each_images_maps_first_and_zeros_after():
    from excelseg.pseudo import pad_maps

    g = torch.Generator().manual_seed(4)
    maps = [torch.rand(k, 3, 5, generator=g) + 0.5 for k in (2, 0, 3)]
    out = pad_maps(maps, 4)
    assert out.shape == (3, 4, 3, 5)
    for m, row in zip(maps, out):
        assert torch.equal(row[: m.shape[0]], m) and not row[m.shape[0]:].any()
    few, many = _count(pad_maps, maps, 4), _count(pad_maps, maps * 8, 4)
    assert many.kernels == few.kernels  # not one pad per image
