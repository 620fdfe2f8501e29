"""Static Visual Calibration (SVC): intra-correlation attention (paper §3.3, EXCEL_SPEC §3.1).

Plain CLIP attention softmax(q kᵀ) makes patch tokens collapse onto a few global tokens. SVC replaces it, in the
last few blocks, by the mean of three *intra*-correlations: softmax(q qᵀ), softmax(k kᵀ), softmax(v vᵀ), which keep
each patch close to patches that look like it. The reference sums (not averages) the resulting maps over heads and
applies that single map to every head's value slice; ``head_sum=True`` reproduces this 12× scale, which sets the
ratio between the accumulated calibration and the residual it is added to.

Below SVC: the last-block attention of the training-free peers (MaskCLIP, SCLIP, ClearCLIP, NACLIP) and plain
CLIP, :func:`mode_attention` (``cam.attention``; docs/attention-modes.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from . import _native as native

# T×T attention maps are built for a few heads at a time: one (B, H, T, T) tensor at 448 px and batch 8 is
# 236 MB, and allocating/streaming such tensors made the calibrated forward ~2× slower than chunks that stay in
# cache (benchmarks/cam_throughput.py).
CHUNK_ELEMENTS = 1 << 21


def head_chunks(batch: int, heads: int, tokens: int) -> Iterator[tuple[int, slice]]:
    """(image index, head slice) pairs covering all heads, each chunk holding ≲ CHUNK_ELEMENTS map entries."""
    step = max(1, CHUNK_ELEMENTS // (tokens * tokens))
    for b in range(batch):
        for h0 in range(0, heads, step):
            yield b, slice(h0, min(heads, h0 + step))


def intra_correlation(q: Tensor, k: Tensor, v: Tensor, scale: float, head_sum: bool = True) -> Tensor:
    """Head-reduced SVC map.

    Args:
        q, k, v: (B, H, T, d) per-head projections of ``ln_1(x)`` (raw, not normalised), T = N + 1 tokens.
        scale: attention scale, d ** -0.5.
        head_sum: sum over heads (reference); False averages them.

    Returns:
        (B, T, T) map ``Σ_h (softmax(s q qᵀ) + softmax(s k kᵀ) + softmax(s v vᵀ)) / 3`` (rows sum to H, or 1).
        Float32 CPU tensors outside autograd go to the native kernels (``_native/attention.c``, the same map to
        float rounding); otherwise torch ops, a few heads at a time (:data:`CHUNK_ELEMENTS`).
    """
    b, h, t, _ = q.shape
    lib = native.attention_library_for(q)
    if lib is not None:  # fused C kernels: no per-head T×T map in memory (~2× faster on the CPU)
        out = native.svc_map_cpu(q, k, v, scale, lib)
    else:
        out = q.new_zeros(b, t, t)
        for i, hs in head_chunks(b, h, t):
            for z in (q[i, hs], k[i, hs], v[i, hs]):
                out[i] += torch.softmax(torch.matmul(z, z.transpose(-1, -2)).mul_(scale), dim=-1).sum(dim=0)
    return out.div_(3.0 if head_sum else 3.0 * h)


# ---- the last-block attention modes of training-free dense CLIP methods (docs/attention-modes.md) --------------
#
# Each replaces the attention of the LAST block only (blocks 0…L-2 are untouched) and may drop that block's
# residual and FFN; A is a per-head map over all T tokens (CLS included) applied to the same head's values:
#
#   mode        A (per head)                         after the attention (o = W_o · A v + b_o)
#   none        softmax(s q kᵀ)                      z = x + o; z = z + MLP(ln_2 z)   (plain CLIP)
#   maskclip    I (the value path: A v = v)          z = x + o; z = z + MLP(ln_2 z)   (MaskCLIP, ECCV 2022)
#   sclip       softmax(s q qᵀ) + softmax(s k kᵀ)    z = x + o; z = z + MLP(ln_2 z)   (SCLIP, ECCV 2024; rows sum to 2)
#   clearclip   softmax(s q qᵀ)                      z = o                            (ClearCLIP, ECCV 2024)
#   naclip      softmax(s k kᵀ + Ω)                  z = o                            (NACLIP, WACV 2025)
#
# with Ω[i, j] = exp(−‖p_i − p_j‖² / (2σ²)) over patch grid positions (σ = 5, peak 1, no cut-off) and 0 in the
# CLS row and column. ``svc`` (ExCEL's dual path) is the rest of this module.

LAST_BLOCK_ATTENTION = {"none": "qk", "maskclip": "identity", "sclip": "qq+kk", "clearclip": "qq", "naclip": "kk+gauss"}
KEEPS_RESIDUAL = {"none": True, "maskclip": True, "sclip": True, "clearclip": False, "naclip": False}
NACLIP_SIGMA = 5.0

_omega_cache: dict[tuple, Tensor] = {}


def neighbourhood_bias(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, device=None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """NACLIP's Gaussian neighbourhood Ω (T, T), T = h·w + 1: ``exp(−d² / (2σ²))`` between patch grid positions
    (row-major), 0 in the CLS row and column; cached per grid."""
    key = (tuple(grid), float(sigma), str(device), dtype)
    if key not in _omega_cache:
        h, w = grid
        r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                              indexing="ij")
        pos = torch.stack([r.flatten(), c.flatten()], dim=1)
        omega = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
        omega[1:, 1:] = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * sigma * sigma))
        _omega_cache.clear()  # one grid at a time (the forward runs a view size at a time)
        _omega_cache[key] = omega.to(device=device, dtype=dtype)
    return _omega_cache[key]


def mode_attention(mode: str, q: Tensor, k: Tensor, v: Tensor, scale: float, grid: tuple[int, int],
                   shift: Tensor | None = None) -> Tensor:
    """Per-head attention output ``A v`` (B, H, T, d) of a last-block ``mode`` (table above).

    Args:
        q, k, v: (B, H, T, d) per-head projections of ``ln_1(x)``; scale: d ** -0.5; grid: (h, w) patch grid.
        shift: optional (B, N, N) LVC shift ``E`` added to the patch×patch block of every head's map
            (the LVC re-run on top of the mode, EXCEL_SPEC §4.2): ``A v + E v_patch`` on the patch rows.
    """
    kind = LAST_BLOCK_ATTENTION.get(mode)
    if kind is None:
        raise ValueError(f"unknown last-block attention {mode!r}; known: {', '.join(LAST_BLOCK_ATTENTION)}")
    b, h, t, _ = q.shape
    if kind == "identity":
        out = v.clone()
    else:
        omega = neighbourhood_bias(grid, device=q.device, dtype=q.dtype) if kind == "kk+gauss" else None
        out = torch.empty_like(v)
        for i, hs in head_chunks(b, h, t):
            qi, ki = q[i, hs], k[i, hs]
            if kind == "qk":
                a = torch.softmax(torch.matmul(qi, ki.transpose(-1, -2)).mul_(scale), dim=-1)
            elif kind == "qq":
                a = torch.softmax(torch.matmul(qi, qi.transpose(-1, -2)).mul_(scale), dim=-1)
            elif kind == "qq+kk":
                a = torch.softmax(torch.matmul(qi, qi.transpose(-1, -2)).mul_(scale), dim=-1)
                a += torch.softmax(torch.matmul(ki, ki.transpose(-1, -2)).mul_(scale), dim=-1)
            else:  # kk+gauss
                a = torch.softmax(torch.matmul(ki, ki.transpose(-1, -2)).mul_(scale).add_(omega), dim=-1)
            out[i, hs] = torch.matmul(a, v[i, hs])
    if shift is not None:
        out[:, :, 1:] += torch.matmul(shift.unsqueeze(1).to(v.dtype), v[:, :, 1:])
    return out
