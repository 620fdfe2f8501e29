"""The per-image outputs of ``cam``, ``pseudo-label`` and ``demo``, and telling a re-run which images are done.

Per image, in the output folder::

    <stem>.png            palette pseudo-label (0 = background, i = i-th class of the vocabulary)
    <stem>_overlay.jpg    (``cam``, ``demo``) the image with label colours and a legend, then one heat-map per class
    <stem>_cams.npz       (``--save-cams``) the CAM archive (:mod:`excelseg.io.cams`)

Each file is written atomically (:mod:`excelseg.io.files`), the label last: an existing file is a complete file,
so :func:`is_done` tells a re-run which images are finished, and :func:`stale_temps_of` removes what a killed run
left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..io.cams import cam_archive
from ..io.files import remove_stale_temps, save_jpeg, save_label_png, save_npz
from ..io.images import PathLike
from ..viz import overlay_sheet

if TYPE_CHECKING:
    from ..predictor import CamResult

__all__ = ["OVERLAY_MAX_SIDE", "OVERLAY_MIN_SIDE", "cams_path", "is_done", "label_path", "overlay_path",
           "stale_temps_of", "write_outputs", "write_result"]

OVERLAY_MAX_SIDE = 768  # overlays are for looking at: panels are bounded whatever the image size
OVERLAY_MIN_SIDE = 256


def label_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}.png"


def overlay_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}_overlay.jpg"


def cams_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}_cams.npz"


def _output_paths(out_dir: PathLike, name: str, save_cams: bool, overlay: bool) -> list[Path]:
    paths = [label_path(out_dir, name)]
    paths += [overlay_path(out_dir, name)] if overlay else []
    return paths + ([cams_path(out_dir, name)] if save_cams else [])


def is_done(out_dir: PathLike, name: str, save_cams: bool, overlay: bool = False) -> bool:
    """True when every output of ``name`` exists (atomic writes: an existing file is a complete file)."""
    return all(p.is_file() for p in _output_paths(out_dir, name, save_cams, overlay))


def stale_temps_of(out_dir: PathLike, names: Sequence[str]) -> int:
    """:func:`remove_stale_temps` for the per-image outputs of ``names`` in ``out_dir``."""
    finals = [p.name for n in names for p in _output_paths(out_dir, n, True, True)]
    return remove_stale_temps(out_dir, finals)


def write_outputs(out_dir: PathLike, name: str, label: np.ndarray, archive: dict[str, np.ndarray] | None = None
                  ) -> None:
    """Write ``<name>_cams.npz`` (when given) then ``<name>.png``, each atomically (the label last: its presence
    marks the image done)."""
    if archive is not None:
        save_npz(cams_path(out_dir, name), **archive)
    save_label_png(label_path(out_dir, name), label)


def write_result(out_dir: PathLike, name: str, rgb: np.ndarray, result: CamResult, save_cams: bool = False,
                 cam_size: int | str | None = "full") -> list[Path]:
    """The outputs of ``excelseg cam`` for one image: overlay sheet, CAM archive (with ``save_cams``), label.
    ``rgb`` is the (H, W, 3) uint8 image. Returns the paths written."""
    h, w = result.image_size
    f = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    if max(h, w) * f < OVERLAY_MIN_SIDE:  # tiny images are enlarged so the panels stay readable
        f = OVERLAY_MIN_SIDE / max(h, w)
    small = (max(1, round(h * f)), max(1, round(w * f)))
    rgb_s = np.asarray(Image.fromarray(rgb).resize(small[::-1], Image.BILINEAR)) if f != 1 else rgb
    lab_s = np.asarray(Image.fromarray(result.pseudo_label).resize(small[::-1], Image.NEAREST)) if f != 1 \
        else result.pseudo_label
    names = {0: "background", **dict(zip(result.class_ids, result.class_names))}
    sheet = overlay_sheet(rgb_s, lab_s, names, result.cams_at(small), list(result.class_names),
                          max_side=OVERLAY_MAX_SIDE)
    save_jpeg(overlay_path(out_dir, name), sheet)
    write_outputs(out_dir, name, result.pseudo_label, cam_archive(result, cam_size) if save_cams else None)
    return _output_paths(out_dir, name, save_cams, True)
