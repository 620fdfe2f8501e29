"""Static Visual Calibration (SVC): intra-correlation attention (paper §3.3, EXCEL_SPEC §3.1).

Plain CLIP attention softmax(q kᵀ) makes patch tokens collapse onto a few global tokens. SVC replaces it, in the
last few blocks, by the mean of three *intra*-correlations: softmax(q qᵀ), softmax(k kᵀ), softmax(v vᵀ), which keep
each patch close to patches that look like it. The reference sums (not averages) the resulting maps over heads and
applies that single map to every head's value slice; ``head_sum=True`` reproduces this 12× scale, which sets the
ratio between the accumulated calibration and the residual it is added to.
"""

from __future__ import annotations

import torch
from torch import Tensor


def intra_correlation(q: Tensor, k: Tensor, v: Tensor, scale: float, head_sum: bool = True) -> Tensor:
    """Head-reduced SVC map.

    Args:
        q, k, v: (B, H, T, d) per-head projections of ``ln_1(x)`` (raw, not normalised), T = N + 1 tokens.
        scale: attention scale, d ** -0.5.
        head_sum: sum over heads (reference); False averages them.

    Returns:
        (B, T, T) map ``Σ_h (softmax(s q qᵀ) + softmax(s k kᵀ) + softmax(s v vᵀ)) / 3`` (rows sum to H, or 1).
    """
    acc = None
    for z in (q, k, v):
        a = torch.softmax(torch.matmul(z, z.transpose(-1, -2)) * scale, dim=-1)
        acc = a if acc is None else acc.add_(a)
    reduced = acc.sum(dim=1) if head_sum else acc.mean(dim=1)
    return reduced.div_(3.0)
