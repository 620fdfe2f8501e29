"""Static Visual Calibration (SVC): intra-correlation attention (paper §3.3, EXCEL_SPEC §3.1).

Plain CLIP attention softmax(q kᵀ) makes patch tokens collapse onto a few global tokens. SVC replaces it, in the
last few blocks, by the mean of three *intra*-correlations: softmax(q qᵀ), softmax(k kᵀ), softmax(v vᵀ), which keep
each patch close to patches that look like it. The reference sums (not averages) the resulting maps over heads and
applies that single map to every head's value slice; ``head_sum=True`` reproduces this 12× scale, which sets the
ratio between the accumulated calibration and the residual it is added to.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

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
    """
    b, h, t, _ = q.shape
    out = q.new_zeros(b, t, t)
    for i, hs in head_chunks(b, h, t):
        for z in (q[i, hs], k[i, hs], v[i, hs]):
            out[i] += torch.softmax(torch.matmul(z, z.transpose(-1, -2)) * scale, dim=-1).sum(dim=0)
    return out.div_(3.0 if head_sum else 3.0 * h)
