"""Tests for ``excelseg._triton_par``: PAR's Triton kernels (the CUDA backend, issue 22) run by Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, against the float64 oracle of tests/test_refine.py, and the backend choice
of ``excelseg.par.par`` (EXCEL_SPEC §3.4).

Without Triton these tests skip with the reason, except under ``CI`` (where Triton is installed with torch), where
that is a failure. Sizes are small: the interpreter runs each program as numpy arrays.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from excelseg import par as par_mod
from excelseg.par import PAR_DILATIONS, _neighbour_offsets, _positional_affinity, par
from numerics import F32_REL, GUARD_MARGIN, assert_rel_close, rel_err
from test_refine import _par_naive


@pytest.fixture(scope="module")
def tri():
    try:
        from excelseg import _triton_par
    except ImportError as exc:
        why = f"Triton is not installed here ({exc}); the CUDA PAR kernels cannot be checked"
        if os.environ.get("CI"):  # CI installs torch with Triton: a missing Triton there is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    return _triton_par


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(b, c, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h + 5, w + 3, generator=g, dtype=dtype)
    masks = torch.rand(b, c, h, w, generator=g, dtype=dtype).softmax(1)
    return image, masks


def _direct(tri, image, masks, iters, dilations=PAR_DILATIONS, block=None):
    """``par_triton`` called as ``par`` calls it (paper weights), with an explicit tile size."""
    img = F.interpolate(image.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
    offs = _neighbour_offsets(dilations)
    pos = _positional_affinity(offs, 0.3, 0.01, torch.float32)
    return tri.par_triton(img, masks.float(), [(dy, dx) for dy, dx, _ in offs], pos, 0.3, iters, block=block)


@pytest.mark.parametrize(
    "b,c,h,w,iters,dilations",
    [
        (1, 3, 37, 53, 20, PAR_DILATIONS),  # odd sizes, 2 tiles (the last one partial), the paper's 20 iterations
        (2, 6, 20, 16, 3, PAR_DILATIONS),  # a batch; maps smaller than the largest dilation
        (1, 1, 1, 1, 2, PAR_DILATIONS),  # a single pixel: every neighbour is the pixel itself
        (1, 5, 9, 40, 1, (1, 3)),  # one iteration, 16 neighbours (no padding of the neighbour axis), 5 channels
        (3, 2, 23, 7, 8, (2, 5, 30)),  # 24 neighbours padded to 32, dilation past the map, even iteration count
    ],
)
def test_triton_par_matches_float64_oracle(tri, b, c, h, w, iters, dilations):
    image, masks = _inputs(b, c, h, w, seed=h * w + c)
    expected = _par_naive(image, masks, iters=iters, dilations=dilations)
    out = par(image.float(), masks.float(), iters=iters, dilations=dilations, backend="triton")
    assert out.dtype == torch.float32 and out.shape == masks.shape
    assert_rel_close(out, expected, F32_REL, "triton PAR")
    # one iteration fewer is told apart by more than the pass bound with a margin
    fewer = par(image.float(), masks.float(), iters=iters - 1, dilations=dilations, backend="triton")
    assert rel_err(fewer, expected) > GUARD_MARGIN * F32_REL


def test_tiles_across_rows_and_images(tri):
    # 32-pixel tiles: tiles straddle rows, the last tile of each image is partial (25·13 = 325 = 10·32 + 5), and
    # each image of the batch reads only its own weights and maps
    image, masks = _inputs(3, 4, 25, 13, seed=11)
    expected = _par_naive(image, masks, iters=6)
    out = _direct(tri, image, masks, 6, block=32)
    assert_rel_close(out, expected, F32_REL, "triton PAR, 32-pixel tiles")
    alone = _direct(tri, image[1:2], masks[1:2], 6, block=32)
    assert_rel_close(alone, out[1:2], 1e-6, "image 1 alone vs in the batch")


def test_triton_and_torch_backends_agree_and_labels_match(tri):
    # a [background, classes]-like map: same arithmetic, only the summation order differs (tree sums)
    image, masks = _inputs(2, 3, 48, 64, seed=3, dtype=torch.float32)
    a, b = par(image, masks, backend="triton"), par(image, masks, backend="torch")
    assert (a - b).abs().max() <= 2e-5 * b.abs().max()
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_one_affinity_launch_and_one_per_iteration_whatever_the_batch(tri, monkeypatch):
    seen = []
    real = tri._launch
    monkeypatch.setattr(tri, "_launch", lambda kernel, grid, *a, **kw: (seen.append(grid), real(kernel, grid, *a, **kw)))
    for b, c in ((1, 2), (5, 7)):
        seen.clear()
        image, masks = _inputs(b, c, 9, 11, seed=b)
        par(image.float(), masks.float(), iters=4, backend="triton")
        assert len(seen) == 1 + 4 and all(g[1] == b for g in seen)  # the batch is the grid's second axis


def test_half_precision_maps_are_widened_and_returned_in_their_dtype(tri):
    image, masks = _inputs(1, 3, 12, 10, seed=4, dtype=torch.float32)
    out = par(image, masks.bfloat16(), iters=3, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = par(image, masks.bfloat16().float(), iters=3, backend="triton")
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)


def test_inputs_are_neither_modified_nor_aliased(tri):
    image, masks = _inputs(1, 2, 8, 9, seed=6, dtype=torch.float32)
    before = masks.clone()
    for iters in (1, 2, 3):
        out = par(image, masks, iters=iters, backend="triton")
        assert out.data_ptr() != masks.data_ptr()
    assert torch.equal(masks, before)
    assert torch.equal(par(image, masks, iters=0, backend="triton"), masks)


def test_backend_errors_say_why(tri, monkeypatch):
    image, masks = _inputs(1, 2, 6, 6, seed=7)
    with pytest.raises(RuntimeError, match="float32"):
        par(image, masks, backend="triton")  # float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        par(image.float(), masks.float(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        par(image, masks, backend="cuda")


def test_auto_keeps_the_native_or_torch_path_on_the_cpu(tri, monkeypatch):
    # even with the interpreter on, "auto" never routes CPU tensors to Triton
    calls = []
    monkeypatch.setattr(tri, "par_triton", lambda *a, **k: calls.append(1))
    image, masks = _inputs(1, 2, 6, 7, seed=8, dtype=torch.float32)
    par(image, masks, iters=2)
    par(image.double(), masks.double(), iters=2)
    assert not calls


def test_triton_switch(monkeypatch):
    monkeypatch.setenv("EXCELSEG_TRITON", "0")
    assert not par_mod.triton_enabled()
    monkeypatch.setenv("EXCELSEG_TRITON", "1")
    assert par_mod.triton_enabled()


def test_kernels_compile_for_a_cuda_gpu_without_spilling(tri, monkeypatch, tmp_path):
    # the interpreter runs the kernels as numpy; this compiles them for real (Triton's CUDA backend to PTX, then the
    # bundled ptxas to an sm_90 cubin: no GPU is needed) at a GPU run's launch settings, and asks ptxas for spills
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend")
    from triton.backends.nvidia.compiler import get_ptxas

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    affinity, step = tri._kernels(False)
    ptrs = {"dy_ptr": "*i32", "dx_ptr": "*i32", "H": "i32", "W": "i32"}
    shapes = {"NN": 48, "NN_PAD": 64, "BLOCK": tri.BLOCK_CUDA}
    sigs = {
        "affinity": (affinity, {"img_ptr": "*fp32", "w_ptr": "*fp32", **ptrs, "pos_ptr": "*fp32", "w_color": "fp32"},
                     {"NCH": 3}),
        "step": (step, {"src_ptr": "*fp32", "dst_ptr": "*fp32", "w_ptr": "*fp32", **ptrs, "C": "i32"}, {}),
    }
    for name, (fn, sig, const) in sigs.items():
        const = {**const, **shapes}
        src = ASTSource(fn, {**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tri.WARPS_CUDA})
        ptx = kernel.asm["ptx"]
        if name == "affinity":  # IEEE division and square root, as torch computes them
            assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
        (tmp_path / f"{name}.ptx").write_text(ptx)
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(tmp_path / f"{name}.ptx"), "-o",
                               str(tmp_path / f"{name}.cubin")], capture_output=True, text=True, check=True).stderr
        assert "0 bytes spill stores" in info, info


def test_auto_on_cuda_falls_back_to_gather_when_the_kernels_fail(tri, monkeypatch, caplog):
    # CUDA tensors are not available here: the choice is exercised with the module-level helpers a CUDA call uses
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(par_mod, "_triton_failure", [])
    image, masks = _inputs(1, 2, 7, 8, seed=9, dtype=torch.float32)
    monkeypatch.setattr(tri, "par_triton", broken)
    with caplog.at_level("WARNING", logger="excelseg.par"):
        par_mod._triton_failed(RuntimeError("no kernel image for this GPU"))
    assert "gather" in caplog.text and par_mod._triton_failure
    assert par_mod._triton_module(masks, "auto") is None  # auto no longer tries Triton in this process
    with pytest.raises(RuntimeError, match="no kernel image"):
        par(image, masks, backend="triton")  # an explicit request still runs (and reports) them
