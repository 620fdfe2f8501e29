"""Patch–text alignment: training-free CAMs from calibrated patch features (paper §3.3; EXCEL_SPEC §3.2).

CLIP-Surgery-style alignment as the reference computes it:

1. ``F̂ = F / ‖F‖`` — by default over the *token* axis (per channel, CLS included; a reference quirk kept for
   parity), or per token with ``feature_norm="channels"``;
2. ``S = F̂ Tᵀ`` against the whole vocabulary (foreground classes and background words);
3. class weights from the CLS row: ``w = softmax(2 · S_cls)``, ``w ← w / mean(w)``;
4. redundancy removal ``Z = w ⊙ S − mean_t(w ⊙ S)`` (closed form of the feature-surgery product);
5. min–max per (image, text) over all tokens including CLS; drop CLS; keep the foreground columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def surgery_cams(features: Tensor, text: Tensor, num_classes: int, feature_norm: str = "tokens",
                 cls_weight_scale: float = 2.0) -> Tensor:
    """CAMs of the foreground classes.

    Args:
        features: (B, T, E) calibrated image tokens, T = N + 1 (index 0 = CLS).
        text: (V, E) unit text features; the first ``num_classes`` rows are the foreground classes.
        num_classes: number of foreground rows C.
    Returns:
        (B, C, N) CAMs in [0, 1] (patch tokens row-major).
    """
    if feature_norm == "tokens":
        f = features / features.norm(dim=1, keepdim=True)
    elif feature_norm == "channels":
        f = F.normalize(features, dim=-1)
    else:
        raise ValueError(f"feature_norm must be 'tokens' or 'channels', got {feature_norm!r}")
    sim = f @ text.to(f).T
    w = torch.softmax(cls_weight_scale * sim[:, :1, :], dim=-1)
    w = w / w.mean(dim=-1, keepdim=True)
    z = sim * w
    z = z - z.mean(dim=-1, keepdim=True)
    lo = z.amin(dim=1, keepdim=True)
    hi = z.amax(dim=1, keepdim=True)
    z = (z - lo) / (hi - lo)
    return z[:, 1:, :num_classes].transpose(1, 2)
