"""Generated scenes as a dataset (``--dataset synthetic``): the single-stage trainer on excelseg's synthetic world.

:class:`SyntheticDataset` has the :class:`~excelseg.data.SegDataset` interface the trainer, ``eval`` and the
batch commands use (``ids``, ``class_names``, ``class_ids(name)``, ``has_masks``, ``with_mask``, ``dataset[i]``),
but draws every sample from :class:`~excelseg.synthetic.SceneGenerator` on demand — nothing is prepared or read
from disk, and a sample is a deterministic function of its split and position.

==========  ==================================  =====================================================
split       scenes                              used for
==========  ==================================  =====================================================
``train``   :data:`TRAIN_SCENES` of seed        ``excelseg train --config synthetic`` (image-level labels
            :data:`TRAIN_SEED`                  only reach the losses; masks are loaded only for scoring)
``val``     the first :data:`VAL_SCENES` of     in-training validation (fast)
            :data:`~excelseg.synthetic.HELD_OUT_SEED`
``test``    the first :data:`TEST_SCENES` of    the held-out scenes of ``benchmarks/synthetic_ablation.py``,
            the same seed                       the demo and the quality tests
==========  ==================================  =====================================================

Neither seed is one the shipped synthetic CLIP was trained on (seed 0, then seed 2 for its continuation), and the
heads are trained on other scenes than they are scored on. Images are :data:`SCENE_SIZE` pixels square: the shipped CLIP's native input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data

from ..synthetic import CLASS_NAMES, HELD_OUT_SEED, SceneGenerator

__all__ = ["SCENE_SIZE", "SPLITS", "TEST_SCENES", "TRAIN_SCENES", "TRAIN_SEED", "VAL_SCENES", "SyntheticDataset"]

SCENE_SIZE = 96  # the shipped synthetic CLIP's input side (src/excelseg/assets/synthetic_clip.json)
TRAIN_SEED = 1  # ≠ 0 and 2 (the CLIP's training scenes) and ≠ HELD_OUT_SEED
TRAIN_SCENES = 5000  # a 15-minute CPU run sees each about twice (in different random crops)
VAL_SCENES = 100
TEST_SCENES = 500


#: split → (generator seed, number of scenes)
SPLITS: dict[str, tuple[int, int]] = {
    "train": (TRAIN_SEED, TRAIN_SCENES),
    "val": (HELD_OUT_SEED, VAL_SCENES),
    "test": (HELD_OUT_SEED, TEST_SCENES),
}


class SyntheticDataset(torch.utils.data.Dataset):
    """One split of generated scenes; ``dataset[i]`` is ``{"name", "image" (S, S, 3) uint8, "label" (C,) float32,
    "size" (S, S)}`` plus ``"mask"`` (S, S) uint8 (0 = background, ``i + 1`` = ``class_names[i]``) when
    ``with_mask``; ``transform(sample)`` is applied last (e.g. :class:`~excelseg.data.TrainAugmentation`).

    Args:
        split: ``train``, ``val`` or ``test`` (see the module table).
        size: image side (default :data:`SCENE_SIZE`); n: number of scenes (default the split's).
    """

    kind = "synthetic"
    every_image_labelled = True  # a scene always keeps its first object (SceneGenerator.scene)

    def __init__(self, split: str = "val", transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 with_mask: bool = True, size: int = SCENE_SIZE, n: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not a synthetic split (splits: {', '.join(SPLITS)})")
        seed, count = SPLITS[split]
        self.split = split
        self.n = count if n is None else int(n)
        if self.n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self.generator = SceneGenerator(size=size, seed=seed)
        self.class_names: tuple[str, ...] = CLASS_NAMES
        width = max(5, len(str(max(self.n - 1, 0))))
        self.ids: list[str] = [f"{split}_{i:0{width}d}" for i in range(self.n)]
        self._position = {name: i for i, name in enumerate(self.ids)}
        self.transform = transform
        self.with_mask = bool(with_mask)
        self.index_path = None

    def __repr__(self) -> str:
        return f"SyntheticDataset(split={self.split!r}, images={len(self)}, size={self.generator.size})"

    def __len__(self) -> int:
        return self.n

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return True

    def class_ids(self, name: str) -> list[int]:
        """Image-level label values (1 … C) of scene ``name``."""
        return [c + 1 for c in self.generator.scene(self._position[name]).labels]

    def load_image(self, name: str) -> np.ndarray:
        """The (S, S, 3) uint8 image of scene ``name`` (what ``segment`` / ``pseudo-label`` read)."""
        return self.generator.scene(self._position[name]).image

    def load_mask(self, name: str) -> np.ndarray:
        """The (S, S) uint8 ground truth of scene ``name``."""
        return self.generator.scene(self._position[name]).mask

    def mask_source(self, name: str) -> SyntheticMask:
        """A picklable reference to the ground truth of ``name`` for the scoring workers (``eval``)."""
        return SyntheticMask(self.split, self._position[name], self.generator.size, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.generator.scene(i)
        label = np.zeros(self.num_classes, dtype=np.float32)
        label[list(scene.labels)] = 1.0
        sample: dict[str, Any] = {"name": self.ids[i], "image": scene.image, "label": label,
                                  "size": scene.image.shape[:2]}
        if self.with_mask:
            sample["mask"] = scene.mask
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


@dataclass(frozen=True)
class SyntheticMask:
    """The ground truth of one generated scene, drawn again where it is needed (``load()``)."""

    split: str
    position: int
    size: int
    name: str

    def load(self) -> np.ndarray:
        return _generator(self.split, self.size).scene(self.position).mask

    def __str__(self) -> str:
        return f"synthetic {self.split} scene {self.name}"


@functools.lru_cache(maxsize=8)
def _generator(split: str, size: int) -> SceneGenerator:
    return SceneGenerator(size=size, seed=SPLITS[split][0])
