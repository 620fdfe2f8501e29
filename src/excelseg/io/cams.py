"""The CAM archive: one ``.npz`` format for the CAMs of every command (``cam``, ``pseudo-label``, ``demo``, the app).

``<stem>_cams.npz`` (``--save-cams``)::

    cams         (K, h, w) float16 in [0, 1]: the refined CAMs of the K present classes, at full size or
                 reduced (the patch grid: 20×20 for a 320 input; or longer side N) — see :func:`cam_archive`
    class_ids    (K,) int64 label values (vocabulary index + 1)
    class_names  (K,) str
    size         (2,) int64 original image (H, W)

A 20×20 archive holds K × 800 bytes of CAMs before compression instead of K × H × W × 2 bytes at full size
(≈ 375 kB per class for a 500×375 image). :func:`read_cam_archive` upsamples bilinearly to the original size,
which from a grid archive is exactly how :attr:`excelseg.predictor.CamResult.cams` is made (up to float16
rounding); ``excelseg eval-cams`` reads every archive through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .images import PathLike

__all__ = ["CAM_SIZE_RANGE", "CamMaps", "cam_archive", "cam_size_for", "parse_cam_size", "read_cam_archive"]

CAM_SIZE_RANGE = (4, 256)  # longer side of a reduced CAM archive


class CamMaps(Protocol):
    """What :func:`cam_archive` reads of a result (:class:`excelseg.predictor.CamResult` is one)."""

    grid_cams: object  # (K, h, w) tensor on the patch grid
    class_ids: Sequence[int]
    class_names: Sequence[str]
    image_size: tuple[int, int]

    def cams_at(self, size: tuple[int, int]) -> np.ndarray: ...


def parse_cam_size(text: str) -> int | str | None:
    """``--cam-size``: ``grid`` (``None``: the patch grid), ``full`` (the image size) or N, the longer side."""
    value = str(text).lower()
    if value == "grid":
        return None
    if value == "full":
        return "full"
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--cam-size must be 'grid', 'full' or an integer, got {text!r}") from None
    lo, hi = CAM_SIZE_RANGE
    if not lo <= n <= hi:
        raise ValueError(f"--cam-size must be 'grid', 'full' or between {lo} and {hi} (a reduced size keeps "
                         f"archives small), got {n}")
    return n


def cam_size_for(cam_size: int | str | None, grid: tuple[int, int], image_size: tuple[int, int]
                 ) -> tuple[int, int]:
    """Stored map size: the patch ``grid`` for ``None``, the image for ``"full"``, else the image aspect with
    longer side ``cam_size``."""
    if cam_size is None:
        return int(grid[0]), int(grid[1])
    h, w = int(image_size[0]), int(image_size[1])
    if cam_size == "full":
        return h, w
    f = int(cam_size) / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def cam_archive(result: CamMaps, cam_size: int | str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a CAM archive (module docstring) for one result, stored at ``cam_size``."""
    grid = tuple(result.grid_cams.shape[-2:])
    size = cam_size_for(cam_size, grid, result.image_size)
    if size == grid:
        cams = result.grid_cams.float().clamp(0, 1).cpu().numpy()
    else:
        cams = result.cams_at(size)
    return {"cams": cams.astype(np.float16), "class_ids": np.asarray(result.class_ids, dtype=np.int64),
            "class_names": np.asarray(list(result.class_names), dtype=str),
            "size": np.asarray(result.image_size, dtype=np.int64)}


def read_cam_archive(path: PathLike, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(cams (K, H, W) float32 in [0, 1], class_ids (K,) int64)`` of an archive, bilinearly upsampled to
    ``size`` (default: the original image size recorded in the archive; archives without ``size`` are returned
    as stored)."""
    import torch
    import torch.nn.functional as F

    with np.load(path) as z:
        cams = np.asarray(z["cams"], dtype=np.float32)
        ids = np.asarray(z["class_ids"], dtype=np.int64).reshape(-1)
        stored = tuple(int(v) for v in z["size"]) if "size" in z.files else None
    target = tuple(size) if size is not None else stored
    if cams.ndim != 3 or cams.shape[0] != ids.size:
        raise ValueError(f"CAM archive {path}: cams of shape {cams.shape} for {ids.size} class_ids")
    if target is None or tuple(cams.shape[1:]) == target:
        return cams, ids
    if cams.shape[0] == 0:
        return np.zeros((0, *target), np.float32), ids
    up = F.interpolate(torch.from_numpy(cams)[None], size=target, mode="bilinear", align_corners=False)[0]
    return up.clamp_(0, 1).numpy(), ids
