"""Training augmentation of the reference (EXCEL_SPEC §5.3), seeded through a ``numpy.random.Generator``.

Order: random rescale of both sides by one factor ×U(0.5, 2.0) (PIL bilinear for the image, nearest for the
mask) → horizontal flip with p = 0.5 → pad to at least 320×320 with 0 (image, black) / 255 (mask, ignore) at a
random offset → random 320×320 crop. No colour jitter, no normalisation (the model normalises).

The reference re-draws VOC crops until no single class covers ≥ 75 % of the crop, using the pixel-level GT mask
(EXCEL_SPEC §10.4). That leaks pixel labels into weakly supervised training, so it is off here and only available
as the explicitly named option ``gt_guided_crop=True`` (for reproducing the reference's numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..io.palette import IGNORE_INDEX

__all__ = ["TrainAugmentation", "pad_to_size", "random_crop_box", "rescale", "seed_worker"]


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def rescale(image: np.ndarray, mask: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize both sides by ``scale`` (image bilinear, mask nearest); sides are rounded, at least 1."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL: (width, height)
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def pad_to_size(
    image: np.ndarray, mask: np.ndarray | None, size: int, rng: np.random.Generator,
    image_fill: int = 0, mask_fill: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad to at least ``size × size`` with ``image_fill`` / ``mask_fill``, the content at a random offset."""
    h, w = image.shape[:2]
    ph, pw = max(h, size), max(w, size)
    if (ph, pw) == (h, w):
        return image, mask
    y0 = int(rng.integers(0, ph - h + 1))
    x0 = int(rng.integers(0, pw - w + 1))
    canvas = np.full((ph, pw, image.shape[2]), image_fill, dtype=image.dtype)
    canvas[y0:y0 + h, x0:x0 + w] = image
    if mask is not None:
        mcanvas = np.full((ph, pw), mask_fill, dtype=mask.dtype)
        mcanvas[y0:y0 + h, x0:x0 + w] = mask
        mask = mcanvas
    return canvas, mask


def random_crop_box(hw: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner ``(y, x)`` of a uniformly drawn ``size × size`` crop inside ``hw`` (≥ size)."""
    return int(rng.integers(0, hw[0] - size + 1)), int(rng.integers(0, hw[1] - size + 1))


class TrainAugmentation:
    """The reference training augmentation as a ``transform(sample) -> sample`` for :class:`SegDataset`.

    Acts on ``sample["image"]`` (H×W×3 uint8) and ``sample["mask"]`` (H×W uint8, when present); returns a new
    dict whose ``image`` is ``crop_size × crop_size × 3`` and ``mask`` ``crop_size × crop_size`` (padding: image 0,
    mask 255). Other keys (``name``, ``label``, ``size`` = the original size) are passed through.

    Args:
        crop_size: output side (paper: 320).
        scale_range: range of the uniform rescale factor (paper: 0.5–2.0).
        flip_prob: probability of a horizontal flip (paper: 0.5).
        gt_guided_crop: **leaks pixel labels** — re-draw the crop up to ``crop_tries`` times until no single
            class (background included, 255 excluded) covers ``cat_max_ratio`` or more of the crop, which needs
            the GT mask. The reference does this for VOC (EXCEL_SPEC §10.4); it is not weakly supervised, so it
            is off by default and must only be switched on to reproduce the reference's numbers.
        cat_max_ratio, crop_tries: the reference's 0.75 and 10.
        rng: a ``numpy.random.Generator`` (or an int seed; ``None`` = fresh entropy). Each call draws from it,
            so a seeded generator gives a reproducible sequence. With DataLoader workers use
            ``worker_init_fn=excelseg.data.seed_worker`` so that workers do not replay the same draws.
    """

    def __init__(
        self,
        crop_size: int = 320,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        gt_guided_crop: bool = False,
        cat_max_ratio: float = 0.75,
        crop_tries: int = 10,
        image_fill: int = 0,
        ignore_index: int = IGNORE_INDEX,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(scale_range)}")
        self.crop_size = int(crop_size)
        self.scale_range = (lo, hi)
        self.flip_prob = float(flip_prob)
        self.gt_guided_crop = bool(gt_guided_crop)
        self.cat_max_ratio = float(cat_max_ratio)
        self.crop_tries = int(crop_tries)
        self.image_fill = int(image_fill)
        self.ignore_index = int(ignore_index)
        self.rng = _rng(rng)

    def __repr__(self) -> str:
        return (f"TrainAugmentation(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"flip_prob={self.flip_prob}, gt_guided_crop={self.gt_guided_crop})")

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        rng = rng if rng is not None else self.rng
        image = np.asarray(sample["image"])
        mask = sample.get("mask")
        if self.gt_guided_crop and mask is None:
            raise ValueError("gt_guided_crop needs the GT mask (dataset with_mask=True)")
        image, mask = rescale(image, mask, float(rng.uniform(*self.scale_range)))
        if rng.random() < self.flip_prob:
            image = image[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        image, mask = pad_to_size(image, mask, self.crop_size, rng, self.image_fill, self.ignore_index)
        s = self.crop_size
        for _ in range(max(1, self.crop_tries) if self.gt_guided_crop else 1):
            y, x = random_crop_box(image.shape[:2], s, rng)
            if not self.gt_guided_crop:
                break
            crop = mask[y:y + s, x:x + s]
            _, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
            if counts.size and counts.max() / counts.sum() < self.cat_max_ratio:
                break  # else re-draw; after crop_tries draws the last one is kept
        out = dict(sample)
        out["image"] = np.ascontiguousarray(image[y:y + s, x:x + s])
        if mask is not None:
            out["mask"] = np.ascontiguousarray(mask[y:y + s, x:x + s])
        return out


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give the dataset's transform its own generator per worker.

    Seeded from ``torch.initial_seed()`` (the loader's base seed + worker id), so a DataLoader with a seeded
    ``generator`` is reproducible and workers draw different augmentations.
    """
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None and hasattr(transform, "rng"):
        transform.rng = np.random.default_rng(torch.initial_seed() % 2**63)
