"""Image → network input (EXCEL_SPEC §1 "input normalisation", parity README §3.2).

The reference normalises at the original size with the ImageNet/mmseg constants (0–255 space) and resizes to
320×320 with bilinear interpolation, align_corners=False, no antialiasing, aspect ratio not kept. Bilinear
resizing commutes with a per-channel affine normalisation, so excelseg resizes first (cheaper) and normalises the
small tensor. The training-free peers of :mod:`excelseg.calibration` (MaskCLIP, SCLIP, ClearCLIP, NACLIP) use CLIP's
constants as their mmseg configs round them (``"clip-mmseg"``); ``exact=True`` resizes in float64 (half-pixel
bilinear, no rounding), the input their parity goldens were made from. Very large images are first shrunk by an integer box filter (Pillow ``reduce``) to at most
``MAX_PRE_SIDE`` so memory stays bounded; images up to that size follow the reference exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .config import CLIP_MEAN, CLIP_MMSEG_MEAN, CLIP_MMSEG_STD, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

MAX_PRE_SIDE = 4096

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD),
                  "clip-mmseg": (CLIP_MMSEG_MEAN, CLIP_MMSEG_STD)}


Normalization = str | tuple[Sequence[float], Sequence[float]]


def normalization_constants(normalization: Normalization) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) in 0–255 space of a named normalization (``imagenet``, ``clip``) or an explicit pair."""
    if isinstance(normalization, tuple):
        return normalization
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)} or 'weights', "
                         f"got {normalization!r}")
    return NORMALIZATIONS[normalization]


def normalize_pixels(x: Tensor, normalization: Normalization = "imagenet") -> Tensor:
    """(..., 3, H, W) float pixels in 0–255 → normalised with the ``normalization`` constants (0–255 space)."""
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(3, 1, 1)
                 for v in normalization_constants(normalization))
    return (x - mean) / std


def network_input(rgb: np.ndarray, size: tuple[int, int], normalization: Normalization = "imagenet",
                  flip: bool = False, exact: bool = False) -> Tensor:
    """(H, W, 3) uint8 RGB → (3, size[0], size[1]) float32 normalised tensor (optionally mirrored); ``exact``:
    the bilinear resize in float64, cast to float32 before the normalisation."""
    normalization_constants(normalization)  # a bad name fails before any work
    h, w = rgb.shape[:2]
    factor = int(np.ceil(max(h, w) / MAX_PRE_SIDE))
    if factor > 1:
        rgb = np.array(Image.fromarray(rgb).reduce(factor))
    if not rgb.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        rgb = rgb.copy()
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    x = x.double() if exact else x.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    x = x.float()
    x = normalize_pixels(x, normalization)
    return x[0].flip(-1) if flip else x[0]


def denormalize_uint8(x: Tensor, normalization: Normalization = "imagenet") -> Tensor:
    """(B, 3, H, W) normalised input → the training PAR image: ``uint8(x·std + mean) / 255`` (truncation, as the
    reference's ``denormalize_img2``; parity README §3.3 "PAR image")."""
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                 for v in normalization_constants(normalization))
    return (x * std + mean).clamp_(0, 255).floor_() / 255
