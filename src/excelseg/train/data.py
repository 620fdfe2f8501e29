"""The training data: labelled images with the reference augmentation, seeded per (seed, epoch, index), in an
order that a resumed run continues."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ResumableSampler", "TrainSet", "collate", "labelled_indices", "normalize_batch"]


class TrainSet(torch.utils.data.Dataset):
    """The labelled images of a split with the reference augmentation, seeded per (seed, epoch, index)."""

    def __init__(self, base, indices: list[int], augmentation, seed: int):
        self.base, self.indices, self.aug, self.seed, self.epoch = base, indices, augmentation, int(seed), 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.base[self.indices[i]]
        out = self.aug(sample, rng=np.random.default_rng([self.seed, self.epoch, int(i)]))
        out.pop("mask", None)
        return out


class ResumableSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` whose next iteration starts ``skip`` samples into the epoch (resume)."""

    skip = 0

    def __iter__(self):
        order = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


def labelled_indices(ds) -> tuple[list[int], int]:
    """Indices of the images with at least one image-level class, and how many have none (a dataset whose
    ``every_image_labelled`` is true, such as the generated scenes, is not asked image by image)."""
    if getattr(ds, "every_image_labelled", False):
        return list(range(len(ds.ids))), 0
    keep = [i for i, name in enumerate(ds.ids) if ds.class_ids(name)]
    return keep, len(ds.ids) - len(keep)


def normalize_batch(images: Tensor, normalization: str) -> Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 normalised (0–255 constants, as the model expects)."""
    from ..preprocess import normalize_pixels

    return normalize_pixels(images.permute(0, 3, 1, 2).float(), normalization)


def collate(batch):
    from ..data import collate_fixed

    return collate_fixed(batch)
