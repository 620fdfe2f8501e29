"""ExCEL training losses (EXCEL_SPEC §5.2; parity README §3.3 "L_seg", "L_div", "total", §5.11).

* :func:`balanced_seg_loss` — ``L_seg``: per-pixel cross-entropy of the upsampled logits, averaged separately over
  background and foreground pixels: ``0.5 (Σ_{y=0} CE / n_bg + Σ_{y∉{0,255}} CE / n_fg)`` (+1e-6 in each
  denominator; label 255 ignored).
* :func:`affinity_labels` — targets for ``L_div``: labels downsampled to the patch grid by nearest neighbour (the
  top-left pixel of each cell), ``1`` for same-label pairs, ``0`` otherwise, ``255`` (ignored) for pairs farther
  apart than ``radius`` in Chebyshev grid distance or with an ignored label. The diagonal is kept (the reference's
  effective definition).
* :func:`affinity_loss` — ``L_div = 0.5 Σ_pos (1 − P) / (n_pos + 1) + 0.5 Σ_neg P / (n_neg + 1)`` over the batch.
* :func:`excel_loss` — ``L = L_seg + 0.1 · L_div``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AffinityLoss", "affinity_labels", "affinity_loss", "balanced_seg_loss", "excel_loss", "radius_mask"]

IGNORE = 255
DIV_WEIGHT = 0.1  # γ: L = L_seg + 0.1 · L_div (EXCEL_SPEC §5.2)
AFF_RADIUS = 8  # Chebyshev radius of the affinity pairs on the patch grid


def balanced_seg_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Background/foreground-balanced cross-entropy ``L_seg`` (EXCEL_SPEC §5.2).

    Args:
        logits: (B, C+1, h, w) decoder logits; bilinearly upsampled (align_corners=False) to the label size.
        labels: (B, H, W) integer labels, 0 = background, ``ignore_index`` ignored.

    Returns:
        0-d loss.
    """
    labels = labels.long()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # (B, H, W), 0 on ignored
    bg = (labels == 0).to(ce.dtype)
    fg = ((labels != 0) & (labels != ignore_index)).to(ce.dtype)
    return 0.5 * ((ce * bg).sum() / (bg.sum() + 1e-6) + (ce * fg).sum() / (fg.sum() + 1e-6))


def radius_mask(grid: tuple[int, int], radius: int = AFF_RADIUS, device=None) -> Tensor:
    """(N, N) bool: token pairs within Chebyshev distance ``radius`` on a row-major ``grid`` (diagonal included)."""
    h, w = grid
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def affinity_labels(labels: Tensor, grid: tuple[int, int], radius: int = AFF_RADIUS,
                    ignore_index: int = IGNORE) -> Tensor:
    """Affinity targets from label maps (EXCEL_SPEC §5.2).

    Args:
        labels: (B, H, W) integer labels (pseudo-labels, or the model's own argmax prediction).
        grid: (h, w) patch grid; labels are downsampled to it with ``F.interpolate(mode="nearest")``.
        radius: pairs farther apart (Chebyshev, in grid cells) are ignored.

    Returns:
        (B, N, N) uint8: 1 same label, 0 different, ``ignore_index`` ignored; N = h·w, row-major.
    """
    small = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="nearest")[:, 0].long().flatten(1)
    same = (small[:, :, None] == small[:, None, :]).to(torch.uint8)
    ignored = (small == ignore_index)
    ignored = ignored[:, :, None] | ignored[:, None, :] | ~radius_mask(grid, radius, labels.device)[None]
    return same.masked_fill_(ignored, ignore_index)


@dataclass
class AffinityLoss:
    loss: Tensor  # 0-d L_div
    pos_count: Tensor  # 0-d int64, positive pairs + 1 (the reference's returned count)
    neg_count: Tensor  # 0-d int64, negative pairs + 1


def affinity_loss(p: Tensor, aff_labels: Tensor) -> AffinityLoss:
    """Affinity ("diversity") loss ``L_div`` on the learned affinity (EXCEL_SPEC §5.2).

    Args:
        p: (B, N, N) learned affinity in (0, 1).
        aff_labels: (B, N, N) targets from :func:`affinity_labels`.
    """
    pos = (aff_labels == 1).to(p.dtype)
    neg = (aff_labels == 0).to(p.dtype)
    n_pos = (aff_labels == 1).sum() + 1
    n_neg = (aff_labels == 0).sum() + 1
    loss = 0.5 * (pos * (1 - p)).sum() / n_pos + 0.5 * (neg * p).sum() / n_neg
    return AffinityLoss(loss, n_pos, n_neg)


def excel_loss(seg_loss: Tensor, div_loss: Tensor, div_weight: float = DIV_WEIGHT) -> Tensor:
    """Total ExCEL loss ``L_seg + 0.1 · L_div`` (EXCEL_SPEC §5.2)."""
    return seg_loss + div_weight * div_loss
