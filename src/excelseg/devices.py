"""Choosing the torch device: ``auto`` and the per-process GPU under torchrun."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; a clear error for an unavailable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return device


def device_for_rank(device: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--device`` for this process: under a launcher that sets ``LOCAL_RANK`` (torchrun), ``auto``/``cuda``
    become ``cuda:LOCAL_RANK`` when CUDA is available; anything else is returned unchanged."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_RANK")
    if local is None or str(device or "auto") not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(local) % max(1, torch.cuda.device_count())}"
