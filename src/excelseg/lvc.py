"""Learnable Visual Calibration maths: relation matrix, LVC shift ``E``, learned affinity ``P`` and the affinity
used by refinement (EXCEL_SPEC §3.3 step 1, §4.2; parity README §3.3 "LVC", "P-guided refinement", §5.9).

With ``F_a`` the adapter features (B, C, h, w), ``N = h·w`` tokens in row-major order:

* ``R = F̃ F̃ᵀ`` (B, N, N): cosine similarity of the per-token L2-normalised features;
* ``R' = γ (R − mean(R))`` with the mean over the **whole** B×N×N tensor (batch-coupled, EXCEL_SPEC §10.8), γ = 3;
* LVC shift ``E = softmax(R' with R' < 0 → −∞)`` over the last axis (computed from detached features: LVC has no
  gradient path, EXCEL_SPEC §10.7); the diagonal has ``R = 1 ≥ mean`` so no row is empty;
* learned affinity ``P = sigmoid(R')`` (with gradient; feeds the affinity loss and refinement).

Refinement affinity from the attention maps of the last 6 blocks (patch×patch part) in the reference's scale
(head-mean for ordinary blocks, head-sum for calibrated ones, :func:`reference_attention`):

* static: the mean over the layers;
* P-guided: ``d_l = Σ(P − A_l)``; keep layers with ``d_l ≤ mean_l d_l``; mean of the kept layers ``⊙ P``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "affinity_from_attention",
    "learned_affinity",
    "lvc_shift",
    "p_guided_affinity",
    "reference_attention",
    "relation",
    "relation_logits",
    "shift_from_logits",
]

RELATION_GAIN = 3.0  # γ in R' = γ (R − mean R) (EXCEL_SPEC §4.2)


def relation(fts: Tensor) -> Tensor:
    """Cosine relation matrix ``R`` (EXCEL_SPEC §4.2).

    Args:
        fts: (B, C, h, w) adapter features ``F_a``.

    Returns:
        (B, N, N) ``R[b, i, j] = cos(F_a[b, :, i], F_a[b, :, j])``, tokens row-major.
    """
    if fts.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(fts.shape)}")
    f = F.normalize(fts.flatten(2), dim=1)  # (B, C, N), unit columns
    return f.transpose(1, 2) @ f


def relation_logits(fts: Tensor, gain: float = RELATION_GAIN) -> Tensor:
    """``R' = γ (R − mean R)`` (B, N, N) from (B, C, h, w) features; the mean over the whole batch tensor
    (batch-coupled, EXCEL_SPEC §10.8). ``P = sigmoid(R')``; ``E`` masks ``R' < 0``."""
    r = relation(fts)
    return gain * (r - r.mean())


def shift_from_logits(logits: Tensor) -> Tensor:
    """LVC shift ``E = softmax(R')`` over the last axis with every ``R' < 0`` set to −∞ (EXCEL_SPEC §4.2)."""
    return logits.masked_fill(logits < 0, float("-inf")).softmax(dim=-1)


def learned_affinity(fts: Tensor, gain: float = RELATION_GAIN, return_mean: bool = False):
    """Learned affinity ``P = sigmoid(γ (R − mean R))`` (B, N, N) from (B, C, h, w) features (EXCEL_SPEC §4.2).

    Differentiable in ``fts``; the mean couples every image of the batch. ``return_mean``: return
    ``(P, mean R)`` with the 0-d (detached) batch mean of ``R``.
    """
    r = relation(fts)
    mean = r.mean()
    p = torch.sigmoid(gain * (r - mean))
    return (p, mean.detach()) if return_mean else p


def lvc_shift(fts: Tensor, gain: float = RELATION_GAIN) -> Tensor:
    """LVC shift ``E`` (B, N, N) from (B, C, h, w) adapter features (EXCEL_SPEC §4.2).

    ``softmax`` over the last axis of ``R' = γ (R − mean R)`` with every entry ``R' < 0`` set to −∞ (the batch
    mean couples the images). Computed without gradient (the reference detaches ``F_a`` here).
    """
    with torch.no_grad():
        return shift_from_logits(relation_logits(fts.detach(), gain))


def reference_attention(attn: Tensor, blocks: Sequence[int], svc_blocks: Sequence[int], num_heads: int,
                        head_sum_on_svc_blocks: bool = True) -> Tensor:
    """Patch×patch attention maps in the reference's scale (EXCEL_SPEC §3.1, §10.2; parity README §5.3).

    Args:
        attn: (B, L, T, T) head-averaged softmax(q kᵀ) maps of ``blocks`` (``DenseOutput.attn``), T = N + 1.
        blocks: the block index of each map; svc_blocks: the calibrated blocks.
        head_sum_on_svc_blocks: the reference returns head-*summed* maps for the calibrated blocks (× H).

    Returns:
        (B, L, N, N) CLS row/column dropped.
    """
    scale = [float(num_heads) if (b in svc_blocks and head_sum_on_svc_blocks) else 1.0 for b in blocks]
    w = torch.tensor(scale, device=attn.device, dtype=attn.dtype).view(1, -1, 1, 1)
    return attn[:, :, 1:, 1:] * w


def affinity_from_attention(maps: Tensor) -> Tensor:
    """Static refinement affinity: (B, L, N, N) maps → (B, N, N) layer mean (EXCEL_SPEC §3.3 step 1)."""
    return maps.mean(dim=1)


def p_guided_affinity(maps: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Refinement affinity guided by the learned affinity ``P`` (EXCEL_SPEC §3.3 step 1).

    Args:
        maps: (B, L, N, N) patch×patch attention in the reference's scale (:func:`reference_attention`).
        p: (B, N, N) learned affinity.

    Returns:
        affinity (B, N, N) = mean of the kept layers ⊙ P; ``layer_diff`` (B, L) = ``Σ_ij (P − A_l)``; ``kept``
        (B, L) bool = ``layer_diff ≤ mean_l layer_diff``.
    """
    p = p.to(maps.dtype)
    diff = (p.unsqueeze(1) - maps).sum(dim=(-2, -1))  # (B, L)
    kept = diff <= diff.mean(dim=1, keepdim=True)
    w = kept.to(maps.dtype)
    mean_kept = (maps * w[:, :, None, None]).sum(dim=1) / w.sum(dim=1)[:, None, None]
    return mean_kept * p, diff, kept
