"""One dataset class for every prepared dataset (VOC, COCO, your own folder), driven by the index JSON."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from ..io.files import read_label_png
from ..io.images import ImageReadError
from .index import check_index, fill_template, label_vector, load_index, load_rgb

__all__ = ["SegDataset", "collate", "collate_fixed"]

Sample = dict[str, Any]


class SegDataset(torch.utils.data.Dataset):
    """Images of one split of a prepared dataset, with image-level labels and (optionally) GT masks.

    Args:
        index: path of an index JSON written by ``excelseg prepare`` or the index dict itself.
        split: a split of the index (VOC: ``train``, ``train_aug``, ``val``, ``trainval``, ``test``;
            COCO: ``train``, ``val``, ``val_part``; folder: ``all``).
        transform: ``transform(sample) -> sample`` applied last (e.g. :class:`~excelseg.data.TrainAugmentation`).
        with_mask: load the GT mask when the split has masks.
        root: dataset root overriding the index's (the data moved since ``prepare``).

    ``dataset[i]`` is a dict:

    * ``name``: image id (str; predictions are written as ``<name>.png``);
    * ``image``: ``(H, W, 3)`` uint8 RGB;
    * ``label``: ``(C,)`` float32 multi-hot image-level label, foreground only, order = ``class_names``;
    * ``mask``: ``(H, W)`` uint8 (0 = background, ``i + 1`` = ``class_names[i]``, 255 = ignore), when loaded;
    * ``size``: ``(H, W)`` of the image as read from disk (before any transform).
    """

    def __init__(
        self,
        index: str | os.PathLike[str] | Mapping[str, Any],
        split: str,
        transform: Callable[[Sample], Sample] | None = None,
        with_mask: bool = True,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(index, Mapping):
            check_index(index)
            self.index_path: Path | None = None
        else:
            self.index_path = Path(index)
            index = load_index(self.index_path)
        self.index = index
        where = str(self.index_path) if self.index_path else "the index"
        if split not in index["splits"]:
            avail = ", ".join(sorted(index["splits"])) or "none"
            raise ValueError(f"split {split!r} is not in {where} (splits: {avail})")
        self.kind: str = index["dataset"]
        self.split = split
        self.root = Path(root) if root is not None else Path(index["root"])
        self.ids: list[str] = list(index["splits"][split])
        self.class_names: tuple[str, ...] = tuple(index["class_names"])
        files = index["files"].get(split, {})
        self._image_templates: list[str] = list(files.get("image") or [])
        self._mask_templates: list[str] = list(files.get("mask") or [])
        self._image_files: Mapping[str, str] = index.get("image_files") or {}
        self._labels: Mapping[str, list[int]] = index.get("labels") or {}
        self.exif_transpose = bool(index.get("exif_transpose", False))
        self.transform = transform
        self.with_mask = bool(with_mask) and self.has_masks

    def __repr__(self) -> str:
        return f"SegDataset({self.kind!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes})"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (label values 1 … C)."""
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        """Whether the split has ground-truth masks (VOC test has none)."""
        return bool(self._mask_templates)

    # ----------------------------------------------------------------------------------------------------------
    def _first_existing(self, templates: list[str], name: str) -> Path:
        paths = [self.root / fill_template(t, name) for t in templates]
        for p in paths:
            if p.is_file():
                return p
        return paths[0]

    def image_path(self, name: str) -> Path:
        if name in self._image_files:
            return self.root / self._image_files[name]
        if not self._image_templates:
            raise ValueError(f"the index names no image files for split {self.split!r}")
        if len(self._image_templates) == 1:
            return self.root / fill_template(self._image_templates[0], name)
        return self._first_existing(self._image_templates, name)

    def mask_path(self, name: str) -> Path | None:
        """Path of the GT mask of ``name`` (first existing candidate), ``None`` when the split has no masks."""
        if not self._mask_templates:
            return None
        return self._first_existing(self._mask_templates, name)

    def class_ids(self, name: str) -> list[int]:
        """Image-level label values (1 … C) of ``name``; empty when unknown (e.g. VOC test)."""
        return [int(v) for v in self._labels.get(name, [])]

    def label(self, name: str) -> np.ndarray:
        return label_vector(self.class_ids(name), self.num_classes)

    def load_image(self, name: str) -> np.ndarray:
        return load_rgb(self.image_path(name), self.exif_transpose)

    def load_mask(self, name: str) -> np.ndarray:
        path = self.mask_path(name)
        if path is None:
            raise ValueError(f"split {self.split!r} has no ground-truth masks")
        if not path.is_file():
            raise ImageReadError(f"ground-truth mask of {name} not found: {path}")
        return read_label_png(path)

    def __getitem__(self, i: int) -> Sample:
        name = self.ids[i]
        image = self.load_image(name)
        sample: Sample = {"name": name, "image": image, "label": self.label(name), "size": image.shape[:2]}
        if self.with_mask:
            mask = self.load_mask(name)
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"mask {self.mask_path(name)} is {mask.shape[1]}x{mask.shape[0]} but image "
                    f"{self.image_path(name)} is {image.shape[1]}x{image.shape[0]}"
                )
            sample["mask"] = mask
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


def collate(batch: list[Sample]) -> dict[str, Any]:
    """Batch variable-size samples: ``image`` / ``mask`` / ``name`` / ``size`` stay lists (numpy arrays),
    ``label`` is stacked to a ``(B, C)`` float32 tensor."""
    out: dict[str, Any] = {key: [s[key] for s in batch] for key in batch[0] if key != "label"}
    out["label"] = torch.from_numpy(np.stack([s["label"] for s in batch]))
    return out


def collate_fixed(batch: list[Sample]) -> dict[str, Any]:
    """Batch equal-size samples (training crops): ``image`` → ``(B, H, W, 3)`` uint8 tensor, ``mask`` →
    ``(B, H, W)`` uint8 tensor, ``label`` → ``(B, C)`` float32; ``name`` and ``size`` stay lists."""
    shapes = {s["image"].shape for s in batch}
    if len(shapes) > 1:
        raise ValueError(f"collate_fixed needs equal image sizes, got {sorted(shapes)}; use collate")
    out = collate(batch)
    out["image"] = torch.from_numpy(np.stack(out["image"]))
    if "mask" in out:
        out["mask"] = torch.from_numpy(np.stack(out["mask"]))
    return out
