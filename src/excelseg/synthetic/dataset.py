"""Synthetic scenes on disk and as held-out evaluation samples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..vocab import Vocabulary
from .knowledge import knowledge_base
from .scenes import BACKGROUNDS, CLASSES, ClassSpec, SceneGenerator


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int = 128,
    *,
    num_objects: int | tuple[int, int] = (1, 3),
    classes: Sequence[ClassSpec] = CLASSES,
    progress: bool = False,
) -> Path:
    """Write scenes ``0 … n − 1`` of ``SceneGenerator(size, num_objects, classes, seed)`` to ``out_dir``.

    Layout (every file written atomically; names zero-padded to at least 5 digits)::

        images/00000.png     RGB
        masks/00000.png      palette PNG, index 0 background, 1 + class index (excelseg.io.files.save_label_png)
        labels.json          {"00000": ["red disc", ...], ...}   classes present, in class order
        captions.json        {"00000": "a photo of ...", ...}
        knowledge.json       knowledge_base(classes)
        dataset.json         seed, size, n, num_objects and the class table

    Returns ``Path(out_dir)``.
    """
    from ..io.files import save_json, save_label_png, save_png

    gen = SceneGenerator(size=size, num_objects=num_objects, classes=classes, seed=seed)
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    out = Path(out_dir)
    width = max(5, len(str(max(n - 1, 0))))
    labels: dict[str, list[str]] = {}
    captions: dict[str, str] = {}
    indices: Any = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synthetic scenes", unit="scene")
    for i in indices:
        sc = gen.scene(i)
        stem = f"{i:0{width}d}"
        save_png(out / "images" / f"{stem}.png", sc.image)
        save_label_png(out / "masks" / f"{stem}.png", sc.mask)
        labels[stem] = list(sc.names)
        captions[stem] = sc.caption
    save_json(out / "labels.json", labels)
    save_json(out / "captions.json", captions)
    save_json(out / "knowledge.json", knowledge_base(gen.classes))
    save_json(out / "dataset.json", {
        "format": "excelseg-synthetic/1",
        "seed": gen.seed,
        "size": gen.size,
        "n": n,
        "num_objects": list(gen.num_objects),
        "classes": [{"name": c.name, "shape": c.shape, "colour": c.colour, "pattern": c.pattern, "size": c.size}
                    for c in gen.classes],
    })
    return out


HELD_OUT_SEED = 20251  # scenes for evaluation; training uses other seeds


def synthetic_vocabulary(classes: Sequence[ClassSpec] = CLASSES) -> Vocabulary:
    """The scene classes (label i + 1 = class i, as in the masks) with the backgrounds as background words."""
    names = tuple(c.name for c in classes)
    return Vocabulary(names, names, tuple(f"{b} background" for b in BACKGROUNDS), "synthetic")


def held_out_samples(n: int, size: int, seed: int = HELD_OUT_SEED) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
    """(image, mask, labels) of ``n`` scenes from a seed the synthetic CLIP was not trained on."""
    gen = SceneGenerator(size=size, seed=seed)
    for i in range(n):
        scene = gen.scene(i)
        yield scene.image, scene.mask, scene.labels
