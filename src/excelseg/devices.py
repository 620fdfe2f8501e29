"""Choosing the torch device: ``auto`` (the per-process GPU under torchrun:
:func:`excelseg.train.dist.device_for_rank`)."""

from __future__ import annotations

import torch

from ._deprecated import moved


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; a clear error for an unavailable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return device


# the launcher environment is read in one place: excelseg.train.dist (old path kept for one release)
__getattr__ = moved(__name__, {"device_for_rank": "excelseg.train.dist"})
