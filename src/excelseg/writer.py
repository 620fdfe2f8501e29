"""Per-image output files of the training-free commands, all written atomically.

``<stem>.png``            palette pseudo-label (VOC palette; 0 = background, vocabulary index + 1 per class)
``<stem>_overlay.jpg``    the image with label colours and a legend, then one heat-map per class
``<stem>_cams.npz``       (with ``save_cams``) float16 ``cams`` (K×H×W, [0, 1]), ``class_names``, ``class_ids``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .io import save_jpeg, save_label_png, save_npz
from .predictor import CamResult
from .viz import overlay_sheet

OVERLAY_MAX_SIDE = 768  # overlays are for looking at: panels are bounded whatever the image size
OVERLAY_MIN_SIDE = 256


def output_paths(out_dir: Path, stem: str, save_cams: bool) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg"]
    return paths + [out_dir / f"{stem}_cams.npz"] if save_cams else paths


def is_done(out_dir: Path, stem: str, save_cams: bool) -> bool:
    """True when every output of ``stem`` exists (atomic writes: an existing file is a complete file)."""
    return all(p.is_file() for p in output_paths(out_dir, stem, save_cams))


def write_result(out_dir: Path, stem: str, rgb: np.ndarray, result: CamResult, save_cams: bool = False) -> list[Path]:
    """Write the outputs of one image; returns their paths. ``rgb`` is the (H, W, 3) uint8 image."""
    label_path, overlay_path, *rest = output_paths(out_dir, stem, save_cams)
    save_label_png(label_path, result.pseudo_label)
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
    save_jpeg(overlay_path, sheet)
    if save_cams:
        save_npz(rest[0], cams=result.cams.astype(np.float16), class_names=np.array(result.class_names),
                 class_ids=np.array(result.class_ids, dtype=np.int64))
    return output_paths(out_dir, stem, save_cams)
