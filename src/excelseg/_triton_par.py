"""PAR on CUDA as Triton kernels (EXCEL_SPEC §3.4; issue 22): one affinity launch and one launch per iteration for a
whole batch, whatever its size or channel count.

* ``affinity``: one program per (tile of ``BLOCK`` pixels, image) gathers the 48 dilated neighbours of every pixel
  of the tile (coordinates clamped to the image = replicate padding) in each colour channel, computes their unbiased
  std, the logits ``−mean_rgb ((I_n − I) / ((std + 1e-8) · w_color))²``, their softmax over the neighbours and adds
  the positional term; it writes the (B, Nn, H, W) weights once.
* ``step``: one program per (tile, image) loads the tile's Nn weights once and, for every channel, sums the Nn
  weighted neighbours (clamped gathers) into the other of two ping-pong buffers.

The arithmetic is the torch implementation's (:func:`excelseg.par.par`, ``backend="torch"``) in float32 with IEEE
division and square root; only the order of the sums differs (tree reductions over the neighbours), so the two
agree to float rounding. The kernels are compiled on first use; with ``TRITON_INTERPRET=1`` set before that, they
run on CPU tensors through Triton's interpreter (how the test suite checks them without a GPU).

Imported lazily by :mod:`excelseg.par`; importing it needs :mod:`triton`.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["interpreting", "par_triton"]

# Pixels per program and warps per program on a GPU: a 64 × 64 (Nn padded) tile over 8 warps = 16 values per thread
# per tile-sized tensor. ptxas for sm_90 (no GPU needed): affinity 79 registers, step 64, no spills; 128 pixels on 4
# warps needed 255 registers and spilled (affinity), 214 (step). The interpreter runs whole tiles as numpy arrays,
# so there a larger tile means fewer (slow) program launches.
BLOCK_CUDA, WARPS_CUDA, BLOCK_INTERPRET_MAX = 64, 8, 1024


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels (on CPU tensors) rather than compile them."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# The reductions call ``tl.reduce`` with Triton's own combine functions (what ``tl.sum`` / ``tl.max`` do inside):
# ``tl.sum`` and ``tl.max`` are themselves jitted, so when Triton was imported before ``TRITON_INTERPRET=1`` was set
# (a test session) the interpreter cannot call them, while it maps these combine functions to numpy reductions.


def _neighbourhood(dy_ptr, dx_ptr, H, W, NN: tl.constexpr, NN_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """The tile of this program (``BLOCK`` pixels of an H × W image) and its neighbours, for both kernels.

    Returns ``pix`` (BLOCK,) flat pixel indices, ``pm`` their in-image mask, ``n`` / ``nm`` (NN_PAD,) neighbour
    indices and their mask (< NN), ``off`` (NN_PAD, BLOCK) flat indices of the neighbours with coordinates clamped
    to the image (= replicate padding) and ``m2`` (NN_PAD, BLOCK) the mask of the valid (neighbour, pixel) pairs."""
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = pix < H * W
    y = pix // W
    x = pix % W
    n = tl.arange(0, NN_PAD)
    nm = n < NN
    dy = tl.load(dy_ptr + n, mask=nm, other=0)
    dx = tl.load(dx_ptr + n, mask=nm, other=0)
    yy = tl.minimum(tl.maximum(y[None, :] + dy[:, None], 0), H - 1)
    xx = tl.minimum(tl.maximum(x[None, :] + dx[:, None], 0), W - 1)
    return pix, pm, n, nm, yy * W + xx, nm[:, None] & pm[None, :]


def _affinity_kernel(img_ptr, w_ptr, dy_ptr, dx_ptr, pos_ptr, H, W, w_color,
                     NCH: tl.constexpr, NN: tl.constexpr, NN_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    pix, pm, n, nm, off, m2 = _neighbourhood(dy_ptr, dx_ptr, H, W, NN, NN_PAD, BLOCK)
    nn_f = tl.full((BLOCK,), NN, tl.float32)
    nn1_f = tl.full((BLOCK,), NN - 1, tl.float32)
    one = tl.full((BLOCK,), 1.0, tl.float32)
    logit = tl.full((NN_PAD, BLOCK), 0.0, tl.float32)  # (tl.zeros is jitted too)
    for c in tl.static_range(NCH):
        base = img_ptr + (b * NCH + c) * hw
        nb = tl.load(base + off, mask=m2, other=0.0)
        ctr = tl.load(base + pix, mask=pm, other=0.0)
        mean = tl.div_rn(tl.reduce(nb, 0, tl.standard._sum_combine), nn_f)
        d = tl.where(m2, nb - mean[None, :], 0.0)
        std = tl.sqrt_rn(tl.div_rn(tl.reduce(d * d, 0, tl.standard._sum_combine), nn1_f))
        inv = tl.div_rn(one, (std + 1e-8) * w_color)
        t = (nb - ctr[None, :]) * inv[None, :]
        logit += t * t
    logit = logit * (-1.0 / NCH)
    logit = tl.where(nm[:, None], logit, float("-inf"))
    e = tl.exp(logit - tl.reduce(logit, 0, tl.standard._elementwise_max)[None, :])
    s = tl.reduce(e, 0, tl.standard._sum_combine)
    pos = tl.load(pos_ptr + n, mask=nm, other=0.0)
    wgt = tl.div_rn(e, tl.broadcast_to(s[None, :], (NN_PAD, BLOCK))) + pos[:, None]
    tl.store(w_ptr + (b * NN + n[:, None]) * hw + pix[None, :], wgt, mask=m2)


def _step_kernel(src_ptr, dst_ptr, w_ptr, dy_ptr, dx_ptr, C, H, W,
                 NN: tl.constexpr, NN_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    hw = H * W
    pix, pm, n, _nm, off, m2 = _neighbourhood(dy_ptr, dx_ptr, H, W, NN, NN_PAD, BLOCK)
    wgt = tl.load(w_ptr + (b * NN + n[:, None]) * hw + pix[None, :], mask=m2, other=0.0)
    for c in range(C):
        base = (b * C + c) * hw
        nb = tl.load(src_ptr + base + off, mask=m2, other=0.0)
        tl.store(dst_ptr + base + pix, tl.reduce(nb * wgt, 0, tl.standard._sum_combine), mask=pm)


@functools.cache
def _kernels(interpret: bool) -> tuple:
    """The jitted kernels; ``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function, so each mode gets its
    own wrappers (a test can switch the interpreter on after this module was imported)."""
    del interpret  # the cache key
    # The kernels call ``_neighbourhood``, which must be jitted in the same mode. Each mode's kernels are copies of
    # the functions over their own globals, whose ``_neighbourhood`` is that mode's (Triton resolves a kernel's
    # names in ``fn.__globals__``; one module-level name rebound per mode would invalidate compiled kernels).
    scope = dict(globals(), _neighbourhood=triton.jit(_neighbourhood))
    return tuple(triton.jit(types.FunctionType(fn.__code__, scope, fn.__name__)) for fn in (_affinity_kernel,
                                                                                              _step_kernel))


@functools.cache
def _tables(device: torch.device, offsets: tuple[tuple[int, int], ...], pos_aff: tuple[float, ...]):
    """The neighbour offsets (int32) and positional weights (float32) on ``device``, copied there once."""
    dy = torch.tensor([o[0] for o in offsets], dtype=torch.int32, device=device)
    dx = torch.tensor([o[1] for o in offsets], dtype=torch.int32, device=device)
    return dy, dx, torch.tensor(pos_aff, dtype=torch.float32, device=device)


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Every kernel launch goes through here (benchmarks/gpu_suite.py counts them)."""
    kernel[grid](*args, **meta)


def par_triton(img: Tensor, masks: Tensor, offsets: Sequence[tuple[int, int]], pos_aff: Sequence[float],
               w_color: float, iters: int, block: int | None = None) -> Tensor:
    """PAR of ``masks`` (B, C, H, W) guided by ``img`` (B, 3, H, W), already at the mask size: ``1 + iters``
    launches. Computes in float32 (float16 / bfloat16 inputs are widened) and returns ``masks.dtype``.

    Tensors live on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``."""
    interp = interpreting()
    if masks.device.type != "cuda" and not (interp and masks.device.type == "cpu"):
        raise RuntimeError(f"the Triton PAR kernels take CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                           f"got {masks.device}")
    if masks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"the Triton PAR kernels compute in float32 (float16/bfloat16 are widened), got {masks.dtype}")
    b, c, h, w = masks.shape
    if iters <= 0 or masks.numel() == 0:
        return masks.clone()
    affinity, step = _kernels(interp)
    launch = {} if interp else {"num_warps": WARPS_CUDA}
    dy, dx, pos = _tables(masks.device, tuple((int(a), int(b_)) for a, b_ in offsets), tuple(map(float, pos_aff)))
    nn = len(offsets)
    nn_pad = max(16, triton.next_power_of_2(nn))
    if block is None:
        block = min(BLOCK_INTERPRET_MAX, triton.next_power_of_2(h * w)) if interp else BLOCK_CUDA
    img = img.to(torch.float32).contiguous()
    x = masks.to(torch.float32).contiguous()  # may be ``masks`` itself: it is only read
    weights = torch.empty(b, nn, h, w, dtype=torch.float32, device=masks.device)
    grid = (triton.cdiv(h * w, block), b)
    _launch(affinity, grid, img, weights, dy, dx, pos, h, w, float(w_color),
            NCH=img.shape[1], NN=nn, NN_PAD=nn_pad, BLOCK=block, **launch)
    bufs = [torch.empty_like(x) for _ in range(min(iters, 2))]
    src = x
    for it in range(iters):
        dst = bufs[it % 2]
        _launch(step, grid, src, dst, weights, dy, dx, c, h, w, NN=nn, NN_PAD=nn_pad, BLOCK=block, **launch)
        src = dst
    return src.to(masks.dtype)
