"""Tests for ``excelseg._native``: the C PAR kernels against the float64 oracle and the torch implementation, their
build (cache, failure, switch-off) and the backend choice of ``excelseg.par.par`` (EXCEL_SPEC §3.4)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from excelseg import _native as native
from excelseg.par import PAR_DILATIONS, _neighbour_offsets, _positional_affinity, par
from numerics import F32_REL, GUARD_MARGIN, assert_rel_close, rel_err
from test_refine import _par_naive


def built(library, why: str):
    """``library`` (a loaded kernel library or None): None skips the test with ``why``, except under CI, whose
    machine has a compiler: not building there is a failure, not a skip."""
    if library is None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return library


@pytest.fixture(scope="module")
def lib():
    return built(native.par_library(),
                 "the native PAR kernels could not be built here (no C compiler? see the warning); torch PAR is tested")


def _inputs(b, c, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h + 5, w + 3, generator=g, dtype=dtype)
    masks = torch.rand(b, c, h, w, generator=g, dtype=dtype).softmax(1)
    return image, masks


def _par_cpu(lib, image, masks, iters, threads, dilations=PAR_DILATIONS, torch_threads=None):
    """``native.par_cpu`` called as ``par`` calls it (paper weights), with an explicit library and thread count
    (and torch's thread count during the call: the kernels use torch's OpenMP threads when it has enough). The
    guidance image is resized first, at the test's thread count: torch's float32 bilinear resize itself differs in
    the last bit between thread counts."""
    img = torch.nn.functional.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    offs = _neighbour_offsets(dilations)
    pos = _positional_affinity(offs, 0.3, 0.01, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads or before)
    try:
        return native.par_cpu(img, masks, [(dy, dx) for dy, dx, _ in offs], pos, 0.3, iters, lib, threads=threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "b,c,h,w,iters,dilations",
    [
        (1, 3, 37, 53, 20, PAR_DILATIONS),  # rows not a whole number of vector tiles (4, 8 or 16 px); 20 iterations = 3 wavefronts
        (2, 6, 20, 16, 3, PAR_DILATIONS),  # a batch; 6 channels = a block of 4 and one of 2; maps smaller than 24
        (1, 1, 1, 1, 2, PAR_DILATIONS),  # a single pixel: every neighbour is the pixel itself
        (1, 5, 9, 40, 1, (1, 3)),  # one iteration, other dilations; 5 channels = 4 + 1
        (1, 2, 60, 7, 9, (2, 5, 30)),  # dilation past the map; odd iteration count
    ],
)
def test_native_par_matches_float64_oracle(lib, b, c, h, w, iters, dilations):
    image, masks = _inputs(b, c, h, w, seed=h * w + c)
    expected = _par_naive(image, masks, iters=iters, dilations=dilations)
    out = par(image.float(), masks.float(), iters=iters, dilations=dilations, backend="native")
    assert out.dtype == torch.float32 and out.shape == masks.shape
    # float32 throughout (as the torch path on float32): a few ulps of the mask magnitude per iteration
    assert_rel_close(out, expected, F32_REL, "native PAR")
    assert_rel_close(par(image.float(), masks.float(), iters=iters, dilations=dilations, backend="torch"), expected,
                     F32_REL, "torch PAR")
    # one iteration fewer is told apart: off by more than the pass bound (F32_REL) with a margin; measured 0.27–0.68,
    # and 0.0099 for the single pixel (each iteration only scales it by 1 + w_pos = 1.01)
    fewer = par(image.float(), masks.float(), iters=iters - 1, dilations=dilations, backend="native")
    assert rel_err(fewer, expected) > GUARD_MARGIN * F32_REL


def test_native_and_torch_backends_agree_on_a_label_sized_map(lib):
    # a VOC-sized [background, classes] map: the two implementations run the same operations in the same order, so
    # they differ by float rounding only (exp: a polynomial vs Sleef; summation order identical)
    image, masks = _inputs(1, 3, 120, 170, seed=3, dtype=torch.float32)
    a, b = par(image, masks, backend="native"), par(image, masks, backend="torch")
    assert (a - b).abs().max() <= 2e-5 * b.abs().max()
    assert torch.equal(a.argmax(1), b.argmax(1))


@pytest.mark.parametrize(
    "b,h,dilations",
    [
        (1, 5, PAR_DILATIONS),  # fewer rows than the largest dilation: every row reads every band
        (1, 37, PAR_DILATIONS),  # bands of 12–19 rows: rows read across one or two band boundaries
        (1, 90, PAR_DILATIONS),  # bands of 30–45 rows around the dilation 24
        (1, 90, (1, 2, 4)),  # bands much taller than the dilations: waits only near the boundaries
        (2, 33, PAR_DILATIONS),  # a batch: images per thread (2 threads), each image in 3 bands (3 threads)
    ],
)
def test_native_par_is_bit_identical_for_any_thread_count_and_wavefront_depth(lib, monkeypatch, b, h, dilations):
    # the iterations of an image are split into bands of rows, one thread each, when there are fewer images than
    # threads (else whole images per thread), run as wavefronts of GROUP iterations and synchronised at the band
    # boundaries; the affinity is split by rows. On torch's OpenMP threads (an OpenMP build, no more threads than
    # torch runs) every image runs in bands. Every output value is computed by the same operations from the same
    # inputs whatever the split, schedule or kind of thread, so the bits must not change — and must be PAR (float64
    # oracle).
    iters = 7  # GROUP 1: 7 wavefronts, 3: two and a partial one, 8: all iterations in one
    for c in range(1, 6):
        image, masks = _inputs(b, c, h, 45, seed=100 * h + c)
        expected = _par_naive(image, masks, iters=iters, dilations=dilations)
        image, masks = image.float(), masks.float()
        first = _par_cpu(lib, image, masks, iters, 1, dilations)
        assert_rel_close(first, expected, F32_REL, f"native PAR, {c} channels")
        for group in (1, 3, 8):
            monkeypatch.setattr(native, "GROUP", group)
            for threads in (1, 2, 3):
                # torch on 1 thread: threads of our own; on 3: torch's OpenMP threads (when the build has OpenMP)
                for torch_threads in (1, 3):
                    out = _par_cpu(lib, image, masks, iters, threads, dilations, torch_threads)
                    assert torch.equal(out, first), f"{c} channels, GROUP {group}, {threads}/{torch_threads} threads"
        monkeypatch.undo()
    if dilations == PAR_DILATIONS:  # through par() with torch's thread count
        torch.testing.assert_close(first, par(image, masks, iters=iters, backend="native"), rtol=0, atol=0)


def test_native_par_leaves_inputs_alone_and_reuses_its_buffers(lib):
    image, masks = _inputs(1, 3, 30, 41, seed=11, dtype=torch.float32)
    before = masks.clone()
    first = par(image, masks, iters=4, backend="native")
    second = par(image, masks, iters=4, backend="native")  # a kept weight buffer is reused: same result
    assert torch.equal(masks, before)
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr() != masks.data_ptr()
    noncontig = par(image, masks.transpose(2, 3).contiguous().transpose(2, 3), iters=4, backend="native")
    assert torch.equal(noncontig, first)


def test_backend_choice(lib, monkeypatch):
    image, masks = _inputs(1, 2, 12, 13, seed=1)
    # float64: 'auto' takes torch (same result as asking for it), 'native' says why not
    torch.testing.assert_close(par(image, masks), par(image, masks, backend="torch"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        par(image, masks, backend="native")
    with pytest.raises(ValueError, match="backend"):
        par(image, masks, backend="cuda")
    # EXCELSEG_NATIVE=0 switches the kernels off: 'auto' runs torch, 'native' fails clearly
    monkeypatch.setenv("EXCELSEG_NATIVE", "0")
    assert native.par_library() is None
    with pytest.raises(RuntimeError, match="not built"):
        par(image.float(), masks.float(), backend="native")
    torch.testing.assert_close(par(image.float(), masks.float()), par(image.float(), masks.float(), backend="torch"),
                               rtol=0, atol=0)


def test_build_goes_to_the_cache_and_a_failing_compiler_falls_back(lib, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
    built = native.par_library()
    assert built is not None
    sos = list((tmp_path / "cache" / "native").glob("par-*.so"))
    assert len(sos) == 1 and not list((tmp_path / "cache" / "native").glob("*.so.tmp*"))
    assert native._build(native._compiler()) == sos[0]  # built once per key: found again, not rebuilt
    # a compiler that fails: one warning, and PAR on torch
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.WARNING, logger="excelseg._native"):
        assert native.par_library() is None
    assert "could not build the native PAR kernels" in caplog.text
    image, masks = _inputs(1, 2, 10, 11, seed=2, dtype=torch.float32)
    torch.testing.assert_close(par(image, masks), par(image, masks, backend="torch"), rtol=0, atol=0)


def test_native_par_gives_the_same_bits_for_any_vector_isa(lib, tmp_path):
    # no FMA contraction and only correctly rounded operations: a build for the x86-64 baseline (SSE2, 4-float
    # vectors) gives the bits of the -march=native build (8 floats with AVX2, 16 with AVX-512), so results depend
    # on neither the machine's CPU nor the vector width
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    flags = [f if f != "-march=native" else "-march=x86-64" for f in native.PAR.flags]
    so = tmp_path / "par-sse2.so"
    subprocess.run([*native._compiler().split(), *flags, str(native.PAR.source), "-o", str(so), "-lm"], check=True,
                   capture_output=True)
    sse2 = native.PAR.bind(ctypes.CDLL(str(so)))
    assert native.vector_length(sse2) == 4
    image, masks = _inputs(2, 5, 29, 37, seed=13, dtype=torch.float32)
    a = _par_cpu(lib, image, masks, 20, threads=1)
    b = _par_cpu(sse2, image, masks, 20, threads=1)
    assert torch.equal(a, b)


def test_native_vectors_are_one_register_wide(lib, tmp_path):
    """The native kernels' vectors (vec.h) are as wide as the CPU's registers: 16 floats with AVX-512, 8 with AVX2,
    4 otherwise. Wider ones are lowered piece by piece through memory: 16-float vectors on an AVX2 CPU made PAR
    ~3–4× slower (docs/benchmarks.md). With GCC both sources are also checked to have no operation that
    -Wvector-operation-performance reports as expanded piecewise."""
    flags = native._cpu_flags().split()
    if platform.machine() in ("x86_64", "AMD64"):
        expected = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
        assert native.vector_length(lib) == expected, (native.vector_length(lib), expected)
    cc = native._compiler()
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, check=False).stdout
    if "Free Software Foundation" not in version:
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("the width is checked on x86-64 and the piecewise-expansion report needs GCC")
        return  # the report is GCC's; the width check above ran
    for kernels in (native.PAR, native.ATTENTION):  # attention.c shares the vector types (vec.h)
        proc = subprocess.run([*cc.split(), *kernels.flags, "-Wvector-operation-performance", str(kernels.source),
                               "-o", str(tmp_path / f"{kernels.name}.so"), "-lm"], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "expanded piecewise" not in proc.stderr, proc.stderr[-2000:]


FORK_SCRIPT = """
import os, torch
from excelseg import _native as native, par as refine
torch.set_num_threads(1)  # torch's own OpenMP pool is not fork-safe; the kernels' thread pool must be
lib = native.par_library()
img, m = torch.randn(2, 3, 30, 30), torch.rand(2, 4, 30, 30)
offs = refine._neighbour_offsets(refine.PAR_DILATIONS)
pos = refine._positional_affinity(offs, 0.3, 0.01, torch.float32)
run = lambda: native.par_cpu(img, m, [(dy, dx) for dy, dx, _ in offs], pos, 0.3, 5, lib, threads=2)
a = run()  # the parent's pool now has threads
pid = os.fork()
if pid == 0:
    os._exit(0 if torch.equal(run(), a) else 3)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def assert_forked_child_agrees(script: str) -> None:
    """Run ``script`` (which forks and prints ``child <exit code>``) in a fresh interpreter: the child must have
    finished (no hang) with exit code 0 (its result equal to the parent's)."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("child 0")


def test_native_par_works_in_a_forked_child(lib):
    # a ThreadPoolExecutor inherited through fork() has no threads in the child: without a fresh pool there, the
    # child's first multi-threaded PAR call waits forever
    assert_forked_child_agrees(FORK_SCRIPT)


THREADLESS_SCRIPT = """
import threading, torch
from excelseg import _native as native, par as refine
torch.set_num_threads(1)
try:  # a thread with the default stack size (what par.c starts) cannot start here
    threading.Thread(target=print).start()
    print("threads start")
except RuntimeError:
    print("threads fail")
threading.stack_size(1 << 20)  # the affinity's Python thread pool still runs
lib = native.par_library()
img, m = torch.randn(1, 3, 40, 30), torch.rand(1, 4, 40, 30)
offs = refine._neighbour_offsets(refine.PAR_DILATIONS)
pos = refine._positional_affinity(offs, 0.3, 0.01, torch.float32)
run = lambda t: native.par_cpu(img, m, [(dy, dx) for dy, dx, _ in offs], pos, 0.3, 5, lib, threads=t)
print("same", torch.equal(run(1), run(3)))
"""


def test_native_par_runs_on_one_thread_when_band_threads_cannot_start(lib):
    # the iterations' band threads wait for each other: if one cannot be started, the others must not wait for it
    # forever, and the calling thread computes the whole image. A default thread stack as large as the address space
    # (glibc takes it from RLIMIT_STACK) makes every pthread_create with default attributes fail in the child.
    resource = pytest.importorskip("resource")

    def huge_stacks():
        resource.setrlimit(resource.RLIMIT_STACK, (1 << 47, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", THREADLESS_SCRIPT], capture_output=True, text=True, timeout=60,
                          check=False, preexec_fn=huge_stacks, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["threads", "fail", "same", "True"]
