"""The per-image outputs of ``cam``, ``pseudo-label`` and ``demo``, and telling a re-run which images are done.

Per image, in the output folder::

    <stem>.png            palette pseudo-label (0 = background, i = i-th class of the vocabulary)
    <stem>_overlay.jpg    (``cam``, ``demo``) the image with label colours and a legend, then one heat-map per class
                          (at most :data:`MAX_HEATMAPS`: the present classes first; the sheet stays ~2560 px)
    <stem>_cams.npz       (``--save-cams``) the CAM archive (:mod:`excelseg.io.cams`)

``<stem>`` is the input's output name (:func:`output_names`): its file stem, or — where inputs share a stem — its
path relative to the colliding inputs' common folder, with the extension kept where that alone still collides
(``y.jpg`` and ``y.png`` → ``y.jpg.png`` and ``y.png.png``; ``a/y.jpg`` and ``b/y.jpg`` → ``a/y.png`` and
``b/y.png`` in sub-folders). Names depend only on the set of inputs, so a re-run finds the same ones.

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

__all__ = ["MAX_HEATMAPS", "OVERLAY_MAX_SIDE", "OVERLAY_MIN_SIDE", "cams_path", "heatmap_order", "is_done",
           "label_path", "output_names", "overlay_path", "stale_temps_of", "write_outputs", "write_result"]

OVERLAY_MAX_SIDE = 768  # overlays are for looking at: panels are bounded whatever the image size
OVERLAY_MIN_SIDE = 256


def output_names(paths: Sequence[PathLike]) -> list[str]:
    """One output name per input image, unique and deterministic (see the module docstring): the file stem where
    it is unique; else the path relative to the common folder of the inputs sharing that stem (``/``-separated:
    outputs go to sub-folders), without the extension where that is unique, with it where not."""
    import os

    files = [Path(p) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(files):
        groups.setdefault(p.stem, []).append(i)
    names = [p.stem for p in files]

    def relative(idx: list[int]) -> list[Path]:
        full = [files[i].resolve() for i in idx]
        common = Path(os.path.commonpath([str(f.parent) for f in full]))
        return [f.relative_to(common) for f in full]

    for idx in groups.values():
        if len(idx) < 2:
            continue
        rel = relative(idx)
        plain = [r.with_suffix("").as_posix() for r in rel]
        chosen = plain if len(set(plain)) == len(plain) else [r.as_posix() for r in rel]
        for i, name in zip(idx, chosen):
            names[i] = name
    clash = {n for n in names if names.count(n) > 1}  # e.g. a stem "y.jpg" next to y.jpg and y.png
    if clash:
        idx = [i for i, n in enumerate(names) if n in clash]
        for i, r in zip(idx, relative(idx)):
            names[i] = r.as_posix()
    return names


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
    """:func:`remove_stale_temps` for the per-image outputs of ``names`` in ``out_dir`` (and its sub-folders,
    for names with a ``/``)."""
    finals: dict[Path, list[str]] = {}
    for n in names:
        for p in _output_paths(out_dir, n, True, True):
            finals.setdefault(p.parent, []).append(p.name)
    return sum(remove_stale_temps(folder, names_there) for folder, names_there in finals.items())


def write_outputs(out_dir: PathLike, name: str, label: np.ndarray, archive: dict[str, np.ndarray] | None = None
                  ) -> None:
    """Write ``<name>_cams.npz`` (when given) then ``<name>.png``, each atomically (the label last: its presence
    marks the image done)."""
    if archive is not None:
        save_npz(cams_path(out_dir, name), **archive)
    save_label_png(label_path(out_dir, name), label)


MAX_HEATMAPS = 24  # heat-maps on an overlay sheet (present classes first), as the web page shows them
SHEET_MAX_SIDE = 2560  # about the longest side of a sheet: with many heat-maps the panels shrink


def heatmap_order(result: CamResult, limit: int = MAX_HEATMAPS) -> list[int]:
    """Indices of the classes whose heat-maps an overlay shows: every class when there are at most ``limit``,
    else the present ones by their share of the label, then the others by their strongest response."""
    k = len(result.class_ids)
    if k <= limit:
        return list(range(k))
    values, counts = np.unique(result.pseudo_label, return_counts=True)
    share = dict(zip(values.tolist(), counts.tolist()))
    peak = result.grid_cams.reshape(k, -1).amax(dim=1).tolist()
    return sorted(range(k), key=lambda i: (-share.get(result.class_ids[i], 0), -peak[i], i))[:limit]


def _cams_at(result: CamResult, shown: list[int], size: tuple[int, int]) -> np.ndarray:
    if len(shown) == len(result.class_ids):
        return result.cams_at(size)
    import torch.nn.functional as F

    up = F.interpolate(result.grid_cams[shown][None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up[0].clamp_(0, 1).cpu().numpy()


def _panel_side(panels: int) -> int:
    """The panel side that keeps a sheet of ``panels`` heat-maps (+ the label panel) within SHEET_MAX_SIDE."""
    import math

    columns = math.ceil(math.sqrt(panels + 1))
    return max(OVERLAY_MIN_SIDE // 2, min(OVERLAY_MAX_SIDE, SHEET_MAX_SIDE // columns))


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
    shown = heatmap_order(result)
    cams = _cams_at(result, shown, small)
    sheet = overlay_sheet(rgb_s, lab_s, names, cams, [result.class_names[k] for k in shown],
                          max_side=_panel_side(len(shown)))
    save_jpeg(overlay_path(out_dir, name), sheet)
    write_outputs(out_dir, name, result.pseudo_label, cam_archive(result, cam_size) if save_cams else None)
    return _output_paths(out_dir, name, save_cams, True)
