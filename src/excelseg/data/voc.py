"""PASCAL VOC 2012: check a VOCdevkit tree and write its index (EXCEL_SPEC §7).

Expected layout (``ROOT`` = ``VOCdevkit/VOC2012``; its parent ``VOCdevkit`` or the folder holding ``VOCdevkit``
are accepted too)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png           VOC masks (train + val, 2,913)
    SegmentationClassAug/<id>.png        optional: SBD-augmented masks (12,031 = train_aug + val)
    ImageSets/Segmentation/{train,val,trainval,test}.txt

Splits: the ImageSets lists as given, and ``train_aug`` = every SegmentationClassAug id not in ``val`` (10,582 on
the real data). Image-level labels are the foreground values present in each mask (SegmentationClassAug preferred,
else SegmentationClass); masks are looked up in the same order when the dataset is read. Images whose mask is
unreadable, differs in size from the image or holds values other than 0–20 and 255, and list entries whose image
is missing, are reported and dropped from every split (``excluded`` in the index).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..vocab import VOC_CLASSES
from .index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    DatasetUnusableError,
    PrepareResult,
    Problem,
    ProgressFn,
    bad_values,
    examples,
    image_size,
    mask_values,
    parallel_map,
)

__all__ = ["LIST_NAMES", "build_voc_index", "find_voc_root"]

LIST_NAMES = ("train", "val", "trainval", "test")
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
AUG_DIR = "SegmentationClassAug"
LIST_DIR = "ImageSets/Segmentation"
NUM_CLASSES = len(VOC_CLASSES)


def find_voc_root(path: str | os.PathLike[str]) -> Path:
    """The ``VOC2012`` folder for ``path`` = ``VOC2012``, ``VOCdevkit`` or the folder holding ``VOCdevkit``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"VOC root not found: {p} is not a directory")
    candidates = [p, p / "VOC2012", p / "VOCdevkit" / "VOC2012"]
    for c in candidates:
        if any((c / d).is_dir() for d in (IMAGE_DIR, MASK_DIR, AUG_DIR, "ImageSets")):
            return c
    raise DatasetUnusableError(
        f"{p} does not look like PASCAL VOC 2012: none of {', '.join(str(c) for c in candidates)} holds "
        f"{IMAGE_DIR}, {MASK_DIR} or ImageSets"
    )


def _read_list(path: Path) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and parts[0] not in seen:
            seen.add(parts[0])
            ids.append(parts[0])
    return ids


def _stems(directory: Path, suffix: str) -> set[str]:
    if not directory.is_dir():
        return set()
    return {e.name[: -len(suffix)] for e in os.scandir(directory)
            if e.name.endswith(suffix) and not e.name.startswith(".")}


def _scan_one(task: tuple[str, str, str | None]) -> tuple[str, Any, Any, str | None]:
    """Worker: ``(id, image size, (mask size, values) or None, error or None)``."""
    name, image_path, mask_path = task
    try:
        hw = image_size(image_path)
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, None, None, f"unreadable image {image_path}: {type(exc).__name__}: {exc}"
    if mask_path is None:
        return name, hw, None, None
    try:
        return name, hw, mask_values(mask_path), None
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, hw, None, f"unreadable mask {mask_path}: {exc}"


def build_voc_index(
    path: str | os.PathLike[str], workers: int = 0, progress: ProgressFn | None = None
) -> PrepareResult:
    """Check a VOC tree and build its index (see the module docstring). Nothing is written.

    Raises:
        DatasetUnusableError: no VOC folder, or JPEGImages / ImageSets/Segmentation / every mask folder missing.
    """
    root = find_voc_root(path)
    image_dir, mask_dir, aug_dir, list_dir = root / IMAGE_DIR, root / MASK_DIR, root / AUG_DIR, root / LIST_DIR
    missing = [d for d in (IMAGE_DIR, LIST_DIR) if not (root / d).is_dir()]
    if not mask_dir.is_dir() and not aug_dir.is_dir():
        missing.append(f"{MASK_DIR} (and {AUG_DIR})")
    if missing:
        raise DatasetUnusableError(f"{root} is not usable: missing {', '.join(missing)}")

    notes: list[str] = []
    problems: list[Problem] = []
    images = _stems(image_dir, ".jpg")
    seg_ids = _stems(mask_dir, ".png")
    aug_ids = _stems(aug_dir, ".png")
    notes.append(f"{IMAGE_DIR}: {len(images)} images; {MASK_DIR}: "
                 + (f"{len(seg_ids)} masks" if mask_dir.is_dir() else "not found")
                 + f"; {AUG_DIR}: " + (f"{len(aug_ids)} masks" if aug_dir.is_dir() else "not found"))
    if not aug_dir.is_dir():
        notes.append(f"{AUG_DIR} not found: train_aug will not be available; see README for SBD")
    lists: dict[str, list[str]] = {}
    for name in LIST_NAMES:
        f = list_dir / f"{name}.txt"
        if f.is_file():
            lists[name] = _read_list(f)
        elif name == "test":
            notes.append(f"{LIST_DIR}/test.txt not found: no test split (it comes with the VOC2012 test download)")
        elif name in ("train", "val"):
            problems.append(Problem(f"{LIST_DIR}/{name}.txt not found: no {name} split"))
    if not lists:
        raise DatasetUnusableError(f"{root} is not usable: no split list in {list_dir}")

    # which files to read: every mask (Aug preferred) and the images named by the lists
    mask_of = {i: aug_dir / f"{i}.png" for i in aug_ids}
    mask_of.update({i: mask_dir / f"{i}.png" for i in seg_ids - aug_ids})
    wanted = set(mask_of) | {i for ids in lists.values() for i in ids}
    excluded: dict[str, str] = {}
    no_image = sorted(i for i in wanted if i not in images)
    for i in no_image:
        excluded[i] = "image missing"
    orphan = sorted(set(no_image) & set(mask_of) - {i for ids in lists.values() for i in ids})
    if orphan:
        problems.append(Problem(f"{len(orphan)} masks have no image in {IMAGE_DIR}: {examples(orphan)}", orphan))
    tasks = [(i, str(image_dir / f"{i}.jpg"), str(mask_of[i]) if i in mask_of else None)
             for i in sorted(wanted - set(no_image))]

    labels: dict[str, list[int]] = {}
    sizes: dict[str, list[int]] = {}
    unreadable: list[str] = []
    size_errors: list[tuple[str, str]] = []
    value_errors: list[tuple[str, str]] = []
    for name, hw, mask, error in parallel_map(_scan_one, tasks, workers, 32, progress, "masks"):
        if error is not None:
            unreadable.append(f"{name} ({error})")
            excluded[name] = error
            continue
        sizes[name] = list(hw)
        if mask is None:
            continue
        mhw, values = mask
        if tuple(mhw) != tuple(hw):
            size_errors.append((name, f"{name} (mask {mhw[1]}x{mhw[0]}, image {hw[1]}x{hw[0]})"))
            excluded[name] = "mask size differs from image size"
            continue
        bad = bad_values(values, NUM_CLASSES)
        if bad:
            value_errors.append((name, f"{mask_of[name]}: {', '.join(map(str, bad))}"))
            excluded[name] = f"mask values outside 0-{NUM_CLASSES} and 255: {bad}"
            continue
        labels[name] = [v for v in values if 1 <= v <= NUM_CLASSES]
    if unreadable:
        problems.append(Problem(f"{len(unreadable)} unreadable files (excluded): {examples(unreadable, 3)}"))
    if size_errors:
        ids = [i for i, _ in size_errors]
        problems.append(Problem(
            f"{len(size_errors)} masks differ in size from their image (excluded from labels and splits): "
            f"{examples([t for _, t in size_errors], 3)}", ids))
    if value_errors:
        ids = [i for i, _ in value_errors]
        problems.append(Problem(
            f"{len(value_errors)} masks hold label values outside 0-{NUM_CLASSES} and 255 (excluded): "
            f"{examples([t for _, t in value_errors], 3)}", ids))

    splits: dict[str, list[str]] = {}
    for name, ids in lists.items():
        gone = [i for i in ids if i in no_image]
        if gone:
            problems.append(Problem(
                f"{LIST_DIR}/{name}.txt names {len(gone)} images missing from {IMAGE_DIR}: {examples(gone)}", gone))
        if name != "test":
            no_mask = [i for i in ids if i not in mask_of and i not in no_image]
            if no_mask:
                problems.append(Problem(
                    f"{LIST_DIR}/{name}.txt names {len(no_mask)} images without a mask in {MASK_DIR} or "
                    f"{AUG_DIR} (excluded): {examples(no_mask)}", no_mask))
                for i in no_mask:
                    excluded[i] = "mask missing"
        splits[name] = [i for i in ids if i not in excluded]
    if aug_dir.is_dir():
        if "val" in lists:
            val = set(lists["val"])
            splits["train_aug"] = sorted(i for i in aug_ids if i not in val and i not in excluded)
        else:
            problems.append(Problem("train_aug not built: it is every SegmentationClassAug id not in val.txt"))
    if not any(splits.values()):
        raise DatasetUnusableError(f"{root} is not usable: no split has a usable image")

    mask_templates = [f"{d}/{{id}}.png" for d in (AUG_DIR, MASK_DIR) if (root / d).is_dir()]
    files = {s: {"image": [f"{IMAGE_DIR}/{{id}}.jpg"], "mask": [] if s == "test" else mask_templates}
             for s in splits}
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dataset": "voc",
        "root": str(root.resolve()),
        "class_names": list(VOC_CLASSES),
        "exif_transpose": False,
        "counts": {s: len(v) for s, v in splits.items()},
        "files": files,
        "splits": splits,
        "labels": labels,
        "sizes": sizes,
        "excluded": dict(sorted(excluded.items())),
        "info": {"label_source": f"{AUG_DIR} preferred, else {MASK_DIR}"},
    }
    return PrepareResult(index, problems, notes)
