"""Native CPU kernels: PAR's affinity and iterations in C (``par.c``), compiled on first use, called via ctypes.

The source is compiled once per machine with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``;
``-O3 -march=native -ffp-contract=off``) into ``<cache>/native/par-<key>.so``, where ``<cache>`` is
``$EXCELSEG_CACHE`` or ``~/.cache/excelseg`` and the key hashes the source, the flags, the compiler's version and
the CPU's feature flags (a cache shared between machines never hands one CPU a binary built for another). The
build goes to a temporary file renamed into place, so concurrent processes do not see half-written libraries.

Without a working compiler, or with ``EXCELSEG_NATIVE=0``, :func:`par_library` returns ``None`` (logging why, once)
and :func:`excelseg.par.par` uses its torch implementation; both compute the same thing in the same order of
operations (tests/test_refine.py holds them to a float64 oracle and to each other).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["default_cache_dir", "native_enabled", "par_cpu", "par_library", "vector_length"]

_logger = logging.getLogger(__name__)

ENV_CACHE = "EXCELSEG_CACHE"
ENV_NATIVE = "EXCELSEG_NATIVE"
SOURCE = Path(__file__).with_name("par.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-pthread", "-fPIC", "-shared")
# Wavefront depth: how many PAR iterations share one pass over the weights (par.c). The working set is about
# GROUP × (largest dilation + 1) weight rows, ≈ 19 MB for a VOC-sized image with 8 (in L3). Measured at 375×500×4,
# 1 thread: 1 → 8 takes the 20 iterations from 45 to 37 ms; 20 (all at once) 41 ms. Any value gives the same bits.
GROUP = 8

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
# Weight buffers kept between calls: a fresh one (B·48·H·W floats, ~37 MB for a VOC image) costs ~15 ms of page
# faults per call, a quarter of the kernels' time. At most KEEP_BUFFERS of up to KEEP_BYTES each are kept (images up
# to ~580×580 px; larger ones, e.g. 1024² = 200 MB, are allocated per call rather than held by a long-lived process).
KEEP_BUFFERS, KEEP_BYTES = 2, 64 << 20
_spare: list[Tensor] = []


def default_cache_dir() -> Path:
    """``EXCELSEG_CACHE`` if set, else ``~/.cache/excelseg`` (not created)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/excelseg").expanduser()


def native_enabled() -> bool:
    """False when ``EXCELSEG_NATIVE`` is 0/false/no/off."""
    return os.environ.get(ENV_NATIVE, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for cand in (os.environ.get("CC", "").strip(), "cc", "gcc", "clang"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    target = default_cache_dir() / "native" / f"par-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc.split(), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        _logger.info("built the native PAR kernels: %s", target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.excelseg_par_affinity.argtypes = [p, p, p, p, i, i, i, i, f, p, i, i, p]
    lib.excelseg_par_affinity.restype = None
    lib.excelseg_par_iterate.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i]
    lib.excelseg_par_iterate.restype = None
    lib.excelseg_par_vector_length.argtypes = []
    lib.excelseg_par_vector_length.restype = i
    return lib


def vector_length(lib: ctypes.CDLL) -> int:
    """Floats per vector the library was built with (par.c's VL: 16 with AVX-512, 8 with AVX2, else 4); rows
    are padded to a multiple of it."""
    return int(lib.excelseg_par_vector_length())


def par_library() -> ctypes.CDLL | None:
    """The compiled PAR kernels, building them on the first call; ``None`` when unavailable (reason logged once)."""
    global _library, _tried
    if not native_enabled():
        return None
    with _lock:
        if not _tried:
            _tried = True
            cc = _compiler()
            if cc is None:
                _logger.warning("no C compiler found ($CC, cc, gcc, clang): PAR runs on torch ops (slower)")
            else:
                try:
                    path = _build(cc)
                    _library = _bind(ctypes.CDLL(str(path)))
                    _logger.info("PAR runs on the native kernels in %s", path)
                except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
                    _logger.warning("could not build the native PAR kernels, PAR runs on torch ops: %s", exc)
    return _library


def _run(calls: list, threads: int) -> None:
    """Run ``(function, *args)`` calls (ctypes calls release the GIL) on up to ``threads`` threads."""
    global _pool, _pool_pid
    if threads <= 1 or len(calls) <= 1:
        for fn, *args in calls:
            fn(*args)
        return
    with _lock:
        # a pool inherited through fork() has no threads in the child: make a new one there
        if _pool is None or _pool._max_workers < threads or _pool_pid != os.getpid():
            _pool, _pool_pid = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="excelseg-par"), os.getpid()
        pool = _pool
    for fut in [pool.submit(*call) for call in calls]:
        fut.result()


def _take(numel: int) -> Tensor:
    """A float32 buffer of at least ``numel`` elements, reused from an earlier call when one is free."""
    with _lock:
        fits = [i for i, buf in enumerate(_spare) if buf.numel() >= numel]
        if fits:
            return _spare.pop(min(fits, key=lambda i: _spare[i].numel()))
    return torch.empty(numel)


def _give(buf: Tensor) -> None:
    if buf.numel() * buf.element_size() <= KEEP_BYTES:
        with _lock:
            _spare.append(buf)
            _spare.sort(key=Tensor.numel, reverse=True)
            del _spare[KEEP_BUFFERS:]


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def par_cpu(img: Tensor, masks: Tensor, offsets: list[tuple[int, int]], pos_aff: list[float], w_color: float,
            iters: int, lib: ctypes.CDLL, threads: int | None = None) -> Tensor:
    """PAR with the native kernels (EXCEL_SPEC §3.4); the arguments are those of :func:`excelseg.par.par`.

    Args:
        img: (B, 3, H, W) float32 CPU guidance image, already at the mask size.
        masks: (B, C, H, W) float32 CPU maps.
        offsets: the Nn neighbour offsets (dy, dx).
        pos_aff: the Nn positional terms ``w_pos · softmax(…)`` added to the colour softmax.
        iters: iterations (≥ 1).
        threads: worker threads (default ``torch.get_num_threads()``). The affinity is split by rows; the iterations
            by image when ``B ≥ threads``, else each image's rows are split into ``threads`` bands (par.c starts a
            thread per band). Every output is bit-identical for any count.

    Returns:
        (B, C, H, W) float32 refined maps.
    """
    b, c, h, w = masks.shape
    nn_ = len(offsets)
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    vl = vector_length(lib)
    wv = -(-w // vl) * vl
    threads = torch.get_num_threads() if threads is None else threads
    dys = torch.tensor([o[0] for o in offsets], dtype=torch.long)
    dxs = torch.tensor([o[1] for o in offsets], dtype=torch.long)
    pos = torch.tensor(pos_aff, dtype=torch.float32)
    image = F.pad(img, (pad, pad + wv - w, pad, pad), mode="replicate").contiguous()
    buffer = _take(b * nn_ * h * wv)
    weights = buffer[: b * nn_ * h * wv].view(b, h, wv // vl, nn_, vl)  # per row, per tile of vl pixels
    maps = [torch.empty(b, c, h, wv + 2 * pad) for _ in range(2)]
    maps[0][..., pad : pad + w] = masks
    maps[0][..., :pad] = masks[..., :1]
    maps[0][..., pad + w :] = masks[..., w - 1 :]

    ptr = Tensor.data_ptr

    def affinity(i: int, rows: tuple[int, int]) -> None:
        scratch = torch.empty(4 * wv)
        lib.excelseg_par_affinity(ptr(image[i]), ptr(weights[i]), ptr(dys), ptr(dxs), nn_, h, wv, pad, w_color,
                                  ptr(pos), rows[0], rows[1], ptr(scratch))

    def iterate(i: int, bands: int) -> None:
        lib.excelseg_par_iterate(ptr(weights[i]), ptr(maps[0][i]), ptr(maps[1][i]), ptr(dys), ptr(dxs), nn_, h, w,
                                 wv, pad, c, iters, GROUP, bands)

    _run([(affinity, i, r) for i in range(b) for r in _split(h, threads)], threads)
    # iterations: whole images per thread when there are enough, else one image after the other, its rows in bands
    # (either way each thread streams only its own share of the weights)
    if b >= threads:
        _run([(iterate, i, 1) for i in range(b)], threads)
    else:
        for i in range(b):
            iterate(i, threads)
    _give(buffer)
    return maps[iters % 2][..., pad : pad + w].clone()
