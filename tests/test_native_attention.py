"""Tests for the native attention kernels (``excelseg/_native/attention.c``): the SVC map (paper §3.3, EXCEL_SPEC
§3.1) and the attention with its head-summed map (the refinement's attention, §3.3 step 1) against float64 oracles,
their independence of the thread count, their build (OpenMP optional) and their dispatch from
``excelseg.calibration`` and the dense encoder."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from excelseg import _native as native
from excelseg.backbone import DenseEncoder
from excelseg.calibration import intra_correlation
from numerics import F64_REL, assert_rel_close, rel_err
from test_native import assert_forked_child_agrees, built

# float32 kernels vs float64: the logits' rounding moves the probabilities by ~1e-6 of the largest map value
# (measured ≤ 2.4e-6 for these inputs, torch's float32 ops alike); 2e-5 leaves an 8× margin, and a map missing one
# of q, k, v or one head is off by > 0.3 (checked below against 1e-2).
KERNEL_REL = 2e-5


@pytest.fixture(scope="module")
def lib():
    return built(native.attention_library(),
                 "the native attention kernels could not be built here (no C compiler? see the warning)")


def _qkv(b, t, h, d, seed):
    """q, k, v (B, H, T, d) float64 as the encoder makes them: views of one (B, T, 3, H, d) projection. Tokens
    share a per-head direction (as CLIP's do), so the intra-correlation softmaxes spread over many tokens instead of
    sitting on the diagonal (independent random tokens give one-hot maps, which would test little)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(b, 1, 3, h, d, generator=g, dtype=torch.float64) * 2.0
    return (shared + torch.randn(b, t, 3, h, d, generator=g, dtype=torch.float64) * 0.5).permute(2, 0, 3, 1, 4)


def _svc_oracle(q, k, v, s):
    return sum(torch.softmax(s * z @ z.transpose(-1, -2), dim=-1).sum(1) for z in (q, k, v))


def _attention_oracle(q, k, v, s, rows):
    p = torch.softmax(s * q @ k.transpose(-1, -2), dim=-1)
    return (p @ v)[:, :, :rows], p.sum(1)


SHAPES = [
    (1, 401, 12, 64),  # ViT-B/16 at 320 px: T not a multiple of the tile, several row panels
    (2, 50, 4, 64),  # a batch, one panel
    (1, 5, 3, 64),  # fewer tokens than one register tile of rows and of columns
    (1, 1, 2, 64),  # a single token: every softmax is 1
]


@pytest.mark.parametrize("b,t,h,d", SHAPES)
def test_svc_map_matches_float64_oracle(lib, b, t, h, d):
    q, k, v = _qkv(b, t, h, d, seed=t + h)
    s = d**-0.5
    expected = _svc_oracle(q, k, v, s)
    out = native.svc_map_cpu(q.float(), k.float(), v.float(), s, lib)
    assert out.dtype == torch.float32 and out.shape == (b, t, t)
    assert_rel_close(out, expected, KERNEL_REL, "native SVC map")
    # the torch path (float32) is held to the same oracle, and both fail a map without v's intra-correlation
    assert_rel_close(intra_correlation(q.float(), k.float(), v.float(), s) * 3, expected, KERNEL_REL, "torch")
    if t > 1:
        assert rel_err(out, expected - torch.softmax(s * v @ v.transpose(-1, -2), -1).sum(1)) > 1e-2


@pytest.mark.parametrize("b,t,h,d", SHAPES)
@pytest.mark.parametrize("all_rows", [True, False])
def test_attention_matches_float64_oracle(lib, b, t, h, d, all_rows):
    q, k, v = _qkv(b, t, h, d, seed=7 * t + h)
    s = d**-0.5
    rows = t if all_rows else 1  # all queries, or the CLS query only (the encoder's last block)
    exp_out, exp_map = _attention_oracle(q, k, v, s, rows)
    out, maps = native.attention_cpu(q.float(), k.float(), v.float(), s, rows, lib)
    assert out.shape == (b, h, rows, d) and maps.shape == (b, t, t)
    assert_rel_close(out, exp_out, KERNEL_REL, "attention output")
    assert_rel_close(maps, exp_map, KERNEL_REL, "head-summed map")
    if t > 1:  # a head missing from the sum is told apart
        assert rel_err(maps, exp_map - torch.softmax(s * q[:, :1] @ k[:, :1].transpose(-1, -2), -1)[:, 0]) > 1e-2


def test_kernels_give_the_same_bits_for_any_thread_count(lib):
    # every row is computed by the same operations whatever the split of rows over threads
    q, k, v = (z.float() for z in _qkv(2, 97, 3, 64, seed=5))
    s = 0.125
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((native.svc_map_cpu(q, k, v, s, lib), *native.attention_cpu(q, k, v, s, 97, lib)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_layouts_other_than_one_projection_give_the_same_result(lib):
    # contiguous (B, H, T, d) tensors and views with unlike strides are handled (copied to one row stride)
    q, k, v = (z.float() for z in _qkv(1, 40, 2, 64, seed=9))
    s = 0.125
    ref = native.svc_map_cpu(q, k, v, s, lib)
    assert torch.equal(native.svc_map_cpu(q.contiguous(), k, v.contiguous(), s, lib), ref)
    ref_out, ref_map = native.attention_cpu(q, k, v, s, 40, lib)
    out, maps = native.attention_cpu(q.contiguous(), k.contiguous(), v, s, 40, lib)
    assert torch.equal(out, ref_out) and torch.equal(maps, ref_map)


def test_dispatch_native_torch_float64_and_autograd(lib, monkeypatch):
    q, k, v = _qkv(1, 30, 2, 64, seed=3)
    s = 0.125
    expected = _svc_oracle(q, k, v, s) / 3
    qf, kf, vf = q.float(), k.float(), v.float()
    # float32 CPU: the kernels (the same bits as calling them), float64: torch ops at float64 accuracy
    assert torch.equal(intra_correlation(qf, kf, vf, s), native.svc_map_cpu(qf, kf, vf, s, lib) / 3)
    assert_rel_close(intra_correlation(q, k, v, s), expected, F64_REL, "float64")
    out, mean = DenseEncoder._attention_with_map(qf, kf, vf, s, 30)
    ref_out, ref_map = native.attention_cpu(qf, kf, vf, s, 30, lib)
    assert torch.equal(out, ref_out) and torch.equal(mean, ref_map / 2)
    # inside autograd: torch ops, so gradients flow
    qg = qf.clone().requires_grad_()
    intra_correlation(qg, kf, vf, s).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    # EXCELSEG_NATIVE=0: torch ops, the same maps to float32 rounding
    monkeypatch.setenv("EXCELSEG_NATIVE", "0")
    assert native.attention_library_for(qf) is None
    assert_rel_close(intra_correlation(qf, kf, vf, s), expected, KERNEL_REL, "torch float32")


NO_OPENMP_CC = """#!/bin/sh
for a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP here" >&2; exit 1; }}; done
exec {cc} "$@"
"""


def test_build_without_openmp_runs_one_thread_and_torch_takes_over(lib, tmp_path, monkeypatch):
    # a compiler without OpenMP: the kernels are built without it (one thread); with torch on more than one thread
    # the dispatch then prefers torch's threaded ops, on one thread the kernels
    cc = tmp_path / "cc-no-openmp"
    cc.write_text(NO_OPENMP_CC.format(cc=native._compiler()))
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_libraries", {})
    serial = native.attention_library()
    assert serial is not None and serial.excelseg_attn_openmp() == 0 and lib.excelseg_attn_openmp() == 1
    q, k, v = (z.float() for z in _qkv(1, 33, 2, 64, seed=4))
    assert torch.equal(native.svc_map_cpu(q, k, v, 0.125, serial), native.svc_map_cpu(q, k, v, 0.125, lib))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native.attention_library_for(q) is None
        torch.set_num_threads(1)
        assert native.attention_library_for(q) is serial
    finally:
        torch.set_num_threads(before)


SHARED_POOL_SCRIPT = """
import torch
from excelseg import _native as native
torch.randn(64, 64) @ torch.randn(64, 64)
lib = native.attention_library()
print(lib.excelseg_attn_openmp(), sorted({l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l}))
"""


def test_kernels_run_on_torchs_openmp_threads(lib):
    # attention.c needs libgomp.so.1; in a process with torch (GNU OpenMP) that must resolve to torch's own copy, so
    # the kernels use the threads torch's loops leave spinning instead of competing with them for the cores
    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("checked on Linux with torch's OpenMP backend")
    if not lib.excelseg_attn_openmp():
        pytest.skip("the kernels were built without OpenMP here")
    proc = subprocess.run([sys.executable, "-c", SHARED_POOL_SCRIPT], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    flag, libs = proc.stdout.strip().split(" ", 1)
    assert flag == "1"
    loaded = ast.literal_eval(libs)
    assert len(loaded) == 1 and os.path.dirname(torch.__file__) in loaded[0], loaded


FORK_SCRIPT = """
import os, torch
from excelseg import _native as native
torch.set_num_threads(2)
lib = native.attention_library()
q, k, v = torch.randn(3, 1, 2, 97, 64).unbind(0)
a = native.svc_map_cpu(q, k, v, 0.125, lib)  # the parent's OpenMP threads now exist
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)  # as torch's DataLoader workers do: GNU OpenMP's threads do not survive fork()
    os._exit(0 if torch.equal(native.svc_map_cpu(q, k, v, 0.125, lib), a) else 3)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_kernels_run_in_a_forked_child_on_one_thread(lib):
    # like torch's own threaded ops, the kernels use the OpenMP threads of the process; a forked child that runs
    # one thread (DataLoader workers do) computes the same bits without waiting for threads it does not have
    assert_forked_child_agrees(FORK_SCRIPT)
