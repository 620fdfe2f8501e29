"""Native CPU kernels in C, compiled on first use, called via ctypes: PAR's affinity and iterations (``par.c``) and
the dense-CLIP attention maps with a fused softmax (``attention.c``: the SVC map and the attention with its
head-summed map).

Each source is compiled once per machine with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``;
``-O3 -march=native``, PAR without FMA contraction, both with ``-fopenmp`` when the compiler takes it) into
``<cache>/native/<name>-<key>.so``, where ``<cache>`` is ``$EXCELSEG_CACHE`` or ``~/.cache/excelseg`` and the key
hashes the sources, the flags, the compiler's version and the CPU's feature flags (a cache shared between machines
never hands one CPU a binary built for another). The build goes to a temporary file renamed into place, so
concurrent processes do not see half-written libraries.

Without a working compiler, or with ``EXCELSEG_NATIVE=0``, :func:`par_library` and :func:`attention_library` return
``None`` (logging why, once) and their callers use torch ops: :func:`excelseg.par.par` its torch implementation
(the same operations in the same order; tests/test_refine.py holds both to a float64 oracle and to each other),
:func:`excelseg.calibration.intra_correlation` and the dense encoder their matmul/softmax loops
(tests/test_native_attention.py holds both to float64).

Built with OpenMP, the kernels run on the process's OpenMP threads — torch's (see ``vec.h``) — so they share torch's
rule for ``fork()``: a forked child must call ``torch.set_num_threads(1)`` before threaded work (torch's
DataLoader workers do), or GNU OpenMP waits for threads the child does not have. PAR uses them only up to torch's
thread count (else threads of its own, which also serve a forked child).
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ATTENTION", "PAR", "attention_cpu", "attention_library", "attention_library_for", "default_cache_dir",
           "native_enabled", "par_cpu", "par_library", "svc_map_cpu", "vector_length"]

_logger = logging.getLogger(__name__)

ENV_CACHE = "EXCELSEG_CACHE"
ENV_NATIVE = "EXCELSEG_NATIVE"
HEADER = Path(__file__).with_name("vec.h")  # included by both sources
# Wavefront depth: how many PAR iterations share one pass over the weights (par.c). The working set is about
# GROUP × (largest dilation + 1) weight rows, ≈ 19 MB for a VOC-sized image with 8 (in L3). Measured at 375×500×4,
# 1 thread: 1 → 8 takes the 20 iterations from 45 to 37 ms; 20 (all at once) 41 ms. Any value gives the same bits.
GROUP = 8

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}  # name → library (None: unavailable); a name is built once
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


def _bind_par(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.excelseg_par_affinity.argtypes = [p, p, p, p, i, i, i, i, f, p, i, i, p]
    lib.excelseg_par_affinity.restype = None
    lib.excelseg_par_iterate.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, i, i, i]
    lib.excelseg_par_iterate.restype = None
    lib.excelseg_par_affinity_all.argtypes = [p, p, p, p, i, i, i, i, f, p, i]
    lib.excelseg_par_affinity_all.restype = i
    for name in ("excelseg_par_vector_length", "excelseg_par_openmp"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = i
    return lib


def _bind_attention(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, pp, i, f, z = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_float, ctypes.c_size_t
    for name in ("excelseg_attn_tile", "excelseg_attn_openmp"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = i
    lib.excelseg_softmax_maps.argtypes = [pp, z, p, i, i, i, i, f, p, pp, z, pp, z, i, i]
    lib.excelseg_softmax_maps.restype = i
    return lib


@dataclass(frozen=True)
class Kernels:
    """One C source and how it is built and bound."""

    name: str
    source: Path
    flags: tuple[str, ...]
    bind: Callable[[ctypes.CDLL], ctypes.CDLL]
    label: str  # for messages: "the native <label> kernels"
    fallback: str  # for messages: what happens without them
    optional: tuple[str, ...] = ()  # flags tried first; the build goes on without them if the compiler refuses


_COMMON = ("-fno-math-errno", "-std=c11", "-pthread", "-fPIC", "-shared")
# PAR: no FMA contraction, so that the kernels compute exactly the torch implementation's operations
PAR = Kernels("par", Path(__file__).with_name("par.c"), ("-O3", "-march=native", "-ffp-contract=off", *_COMMON),
              _bind_par, "PAR", "PAR runs on torch ops", optional=("-fopenmp",))
# attention: matrix products, whose summation order no implementation fixes: FMA (twice the arithmetic rate)
# (and OpenMP, to run on torch's own threads: attention.c)
ATTENTION = Kernels("attention", Path(__file__).with_name("attention.c"),
                    ("-O3", "-march=native", "-ffp-contract=fast", *_COMMON), _bind_attention, "attention",
                    "the attention maps run on torch ops",
                    optional=("-fopenmp",))


def _build(cc: str, kernels: Kernels = PAR) -> Path:
    """The cached library of ``kernels`` built by ``cc`` (with its optional flags if the compiler takes them)."""
    error = None
    for flags in ([*kernels.optional, *kernels.flags], list(kernels.flags)) if kernels.optional else [kernels.flags]:
        try:
            return _build_with(cc, kernels, tuple(flags))
        except RuntimeError as exc:
            error = exc
    raise error


def _build_with(cc: str, kernels: Kernels, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    texts = [kernels.source.read_text(), HEADER.read_text(), " ".join(flags), version, _cpu_flags()]
    key = hashlib.sha256("\0".join(texts).encode())
    target = default_cache_dir() / "native" / f"{kernels.name}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc.split(), *flags, str(kernels.source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        _logger.info("built the native %s kernels: %s", kernels.name, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def vector_length(lib: ctypes.CDLL) -> int:
    """Floats per vector the PAR library was built with (vec.h's VL: 16 with AVX-512, 8 with AVX2, else 4); rows
    are padded to a multiple of it."""
    return int(lib.excelseg_par_vector_length())


def _library(kernels: Kernels) -> ctypes.CDLL | None:
    """The compiled ``kernels``, building them on the first call; ``None`` when unavailable (reason logged once)."""
    if not native_enabled():
        return None
    with _lock:
        if kernels.name not in _libraries:
            _libraries[kernels.name] = None
            cc = _compiler()
            if cc is None:
                _logger.warning("no C compiler found ($CC, cc, gcc, clang): %s (slower)", kernels.fallback)
            else:
                try:
                    path = _build(cc, kernels)
                    _libraries[kernels.name] = kernels.bind(ctypes.CDLL(str(path)))
                    _logger.info("the native %s kernels: %s", kernels.label, path)
                except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
                    _logger.warning("could not build the native %s kernels, %s: %s", kernels.label,
                                    kernels.fallback, exc)
    return _libraries[kernels.name]


def par_library() -> ctypes.CDLL | None:
    """The compiled PAR kernels (``par.c``), built on the first call; ``None`` when unavailable."""
    return _library(PAR)


def attention_library() -> ctypes.CDLL | None:
    """The compiled attention kernels (``attention.c``), built on the first call; ``None`` when unavailable."""
    return _library(ATTENTION)


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
            _pool, _pool_pid = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="excelseg-native"), os.getpid()
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
        threads: worker threads (default ``torch.get_num_threads()``). With an OpenMP build and no more threads
            than torch runs, on torch's OpenMP threads: each image's affinity split by rows, its iterations by
            bands of rows. Otherwise on threads of our own: the affinity split by rows, the iterations by image when
            ``B ≥ threads``, else each image's rows in ``threads`` bands (par.c starts a thread per band). Every
            output is bit-identical for any count and either kind of thread.

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

    # torch's OpenMP threads (par.c, vec.h) when the build has OpenMP: threads of our own competed with them right
    # after torch's ops (in the pipeline the affinity took longer on 2 threads than on 1). Only as many as torch
    # has, so that OpenMP never has to start a thread here (where it cannot, it would abort the process).
    openmp = threads > 1 and bool(lib.excelseg_par_openmp()) and threads <= torch.get_num_threads()

    def iterate(i: int, bands: int) -> None:
        lib.excelseg_par_iterate(ptr(weights[i]), ptr(maps[0][i]), ptr(maps[1][i]), ptr(dys), ptr(dxs), nn_, h, w,
                                 wv, pad, c, iters, GROUP, bands, int(openmp))

    if openmp:
        for i in range(b):
            if lib.excelseg_par_affinity_all(ptr(image[i]), ptr(weights[i]), ptr(dys), ptr(dxs), nn_, h, wv, pad,
                                             w_color, ptr(pos), threads) != 0:
                raise MemoryError("the native PAR kernels could not allocate their scratch rows")
        for i in range(b):  # one image after the other, its rows in bands (batch 2: as fast as an image per thread)
            iterate(i, threads)
    else:
        _run([(affinity, i, r) for i in range(b) for r in _split(h, threads)], threads)
        # iterations: whole images per thread when there are enough, else one image after the other, its rows in
        # bands (either way each thread streams only its own share of the weights)
        if b >= threads:
            _run([(iterate, i, 1) for i in range(b)], threads)
        else:
            for i in range(b):
                iterate(i, threads)
    _give(buffer)
    return maps[iters % 2][..., pad : pad + w].clone()


# ---- attention maps (attention.c) ----------------------------------------------------------------------------------


def attention_library_for(q: Tensor) -> ctypes.CDLL | None:
    """The attention kernels when they apply to (B, H, T, d) ``q`` (and its k, v): float32 CPU tensors outside
    autograd, d a multiple of the kernels' tile, and OpenMP in the build when torch runs more than one thread (a
    one-thread build would be slower than torch's threaded ops); else ``None`` (the caller runs torch ops)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or (q.requires_grad and torch.is_grad_enabled()):
        return None
    lib = attention_library()
    if lib is None or q.shape[-1] % lib.excelseg_attn_tile():
        return None
    return lib if lib.excelseg_attn_openmp() or torch.get_num_threads() == 1 else None


def _head_rows(*zs: Tensor) -> tuple[list[Tensor], int]:
    """(B, H, T, d) tensors with unit column stride and one common row stride (the q, k, v views of one qkv
    projection already are), and that row stride."""
    if any(z.stride(-1) != 1 for z in zs) or len({z.stride(-2) for z in zs}) != 1:
        zs = tuple(z.contiguous() for z in zs)
    return list(zs), zs[0].stride(-2)


def _padded_transpose(zs: list[Tensor], i: int, tp: int) -> Tensor:
    """(n·H·d, tp) transposes of image ``i``'s heads of every tensor in ``zs``, columns past T zero (one 2-D
    transposing copy per tensor: the q, k, v views of one projection transpose as whole (H·d, T) blocks)."""
    _, h, t, d = zs[0].shape
    out = zs[0].new_empty(len(zs) * h * d, tp)
    out[:, t:] = 0
    for j, z in enumerate(zs):
        out[j * h * d : (j + 1) * h * d, :t] = z[i].transpose(-1, -2).reshape(h * d, t)
    return out


def _pointers(rows: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(rows))(*[r.data_ptr() for r in rows])


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the native attention kernels could not allocate their scratch rows")


def svc_map_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, lib: ctypes.CDLL) -> Tensor:
    """``Σ_h Σ_{z ∈ q, k, v} softmax(scale · z_h z_hᵀ)`` (B, T, T): SVC's map before its division by 3 (paper §3.3,
    EXCEL_SPEC §3.1), with no per-head T × T map in memory. q, k, v: (B, H, T, d) float32 CPU; each image's rows
    are split over ``torch.get_num_threads()`` threads."""
    b, h, t, d = q.shape
    zs, lda = _head_rows(q, k, v)
    tile = lib.excelseg_attn_tile()
    tp = -(-t // tile) * tile
    out = q.new_zeros(b, t, t)
    for i in range(b):
        bt = _padded_transpose(zs, i, tp)
        ptrs = _pointers([z[i, j] for z in zs for j in range(h)])
        _check(lib.excelseg_softmax_maps(ptrs, lda, bt.data_ptr(), 3 * h, t, tp, d, scale, out[i].data_ptr(), None,
                                         0, None, 0, 0, torch.get_num_threads()))
    return out


def attention_cpu(q: Tensor, k: Tensor, v: Tensor, scale: float, rows: int, lib: ctypes.CDLL
                  ) -> tuple[Tensor, Tensor]:
    """Plain attention with its map: per head ``P = softmax(scale · q kᵀ)``; returns ``P v`` for the first ``rows``
    queries (B, H, rows, d) and ``Σ_h P`` (B, T, T) (the refinement's attention, paper §3.3), with no per-head
    T × T map in memory. q, k, v: (B, H, T, d) float32 CPU; each image's rows split over torch's thread count."""
    b, h, t, d = q.shape
    (qc,), ldq = _head_rows(q)
    (kc,), _ = _head_rows(k)
    vc = v.contiguous()  # P v reads all T rows of a head per row block: contiguous rows (not 3·H·d apart) stream
    tile = lib.excelseg_attn_tile()
    tp = -(-t // tile) * tile
    out = q.new_empty(b, h, rows, d)
    maps = q.new_zeros(b, t, t)
    for i in range(b):
        kt = _padded_transpose([kc], i, tp)
        qp, vp, op = (_pointers([z[i, j] for j in range(h)]) for z in (qc, vc, out))
        _check(lib.excelseg_softmax_maps(qp, ldq, kt.data_ptr(), h, t, tp, d, scale, maps[i].data_ptr(), vp, d, op,
                                         d, rows, torch.get_num_threads()))
    return out, maps
