"""The dataset index: one small JSON file per prepared dataset, written by ``excelseg prepare``.

Every dataset kind (VOC, COCO, a folder of your own images) is described by the same format, so one dataset class
(:class:`excelseg.data.SegDataset`) and one evaluation command serve all three. Nothing about split lists or labels
is shipped with excelseg: ``prepare`` derives everything from the files on disk.

Format (``format = "excelseg-index"``, ``version = 1``)::

    dataset          "voc" | "coco" | "folder"
    root             absolute dataset root; relative file templates are resolved against it
    class_names      foreground class names; label value i + 1 is class_names[i] (0 = background, 255 = ignore)
    exif_transpose   whether images are read with their EXIF orientation applied (folder datasets only)
    files            {split: {"image": [template, ...], "mask": [template, ...]}}: a template is a path relative
                     to root (or absolute) with "{id}" standing for the image id; the first candidate that
                     exists is used; an empty "mask" list = no ground truth for the split (VOC test)
    image_files      {id: path}: optional per-image paths overriding the "image" templates (folder datasets)
    splits           {split: [id, ...]}: only usable images are listed
    labels           {id: [label value, ...]}: image-level labels (VOC: the classes of Annotations/<id>.xml, else
                     the mask's; COCO: the annotated categories, or the mask's with --labels-from mask; a labels
                     file where given; info["label_source"] says which, per split)
    sizes            {id: [H, W]}
    excluded         {id: reason}: images dropped from every split by ``prepare`` (bad mask, missing file, ...)
    info             dataset-specific facts (COCO: overlap rule, image layout, annotation files; ...)
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.files import atomic_write, read_label_png
from ..io.palette import IGNORE_INDEX

__all__ = [
    "DEFAULT_INDEX_NAME",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "DatasetUnusableError",
    "PrepareResult",
    "Problem",
    "fill_template",
    "image_size",
    "label_vector",
    "load_index",
    "load_rgb",
    "make_index",
    "mask_values",
    "parallel_map",
    "save_index",
]

INDEX_FORMAT = "excelseg-index"
INDEX_VERSION = 1
DEFAULT_INDEX_NAME = "excelseg_index.json"
SHOW_IDS = 5  # how many example ids a problem message names

ProgressFn = Callable[[Iterable[Any], int, str], Iterable[Any]]


class DatasetUnusableError(ValueError):
    """The dataset cannot be indexed at all (essential folders or files missing); one-line message."""


@dataclass
class Problem:
    """Something wrong in the dataset: a one-line message and the ids concerned (all of them)."""

    message: str
    ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


@dataclass
class PrepareResult:
    """What ``prepare`` found: the index (a JSON-ready dict), problems (errors) and notes (information)."""

    index: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def examples(ids: Sequence[str], n: int = SHOW_IDS) -> str:
    """``"a, b, c, … (12 in all)"``: the first ``n`` ids of a list for a message."""
    ids = list(ids)
    text = ", ".join(ids[:n])
    return text + (f", … ({len(ids)} in all)" if len(ids) > n else "")


def fill_template(template: str, image_id: str) -> str:
    return template.replace("{id}", image_id)


# --------------------------------------------------------------------------------------------------------------
# reading


def load_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check an index JSON file; ``ValueError`` / ``FileNotFoundError`` with a one-line message."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset index not found: {p} (write one with 'excelseg prepare')")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read dataset index {p}: {exc}") from None
    check_index(index, str(p))
    return index


def check_index(index: Any, where: str = "index") -> None:
    if not isinstance(index, Mapping) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where} is not an excelseg dataset index (no \"format\": \"{INDEX_FORMAT}\")")
    if index.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{where} has index version {index.get('version')!r}; this excelseg reads version {INDEX_VERSION} "
            "(re-run 'excelseg prepare')"
        )
    for key in ("dataset", "root", "class_names", "files", "splits"):
        if key not in index:
            raise ValueError(f"{where} lacks the key {key!r}; re-run 'excelseg prepare'")


def save_index(path: str | os.PathLike[str], index: Mapping[str, Any]) -> Path:
    """Write the index atomically: one top-level key per line, values compact (the id lists are long)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
             for k, v in index.items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"

    def _write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return atomic_write(path, _write)


def label_vector(class_ids: Iterable[int], num_classes: int) -> np.ndarray:
    """Foreground multi-hot vector ``(C,)`` float32 from label values ``1 … C``."""
    vec = np.zeros(num_classes, dtype=np.float32)
    for v in class_ids:
        if 1 <= int(v) <= num_classes:
            vec[int(v) - 1] = 1.0
    return vec


# --------------------------------------------------------------------------------------------------------------
# files


def image_size(path: str | os.PathLike[str], exif_transpose: bool = False) -> tuple[int, int]:
    """``(H, W)`` of an image from its header (no decode); with ``exif_transpose`` rotated as EXIF says."""
    with Image.open(path) as img:
        w, h = img.size
        if exif_transpose and _exif_orientation(img) in (5, 6, 7, 8):  # 90° rotations swap the sides
            w, h = h, w
    return h, w


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 (malformed EXIF: the pixels are read as stored, as io.read_image does)
        return 1


def load_rgb(path: str | os.PathLike[str], exif_transpose: bool = False) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB pixels of an image file.

    Without ``exif_transpose`` the pixels are taken as stored (how VOC / COCO masks are aligned); grey and
    palette images are converted to RGB. With it, :func:`excelseg.io.images.read_image` is used (EXIF applied, alpha
    over white), as ``excelseg cam`` reads photos.
    """
    from ..io.images import ImageReadError, read_image, to_rgb_array

    if exif_transpose:
        return to_rgb_array(read_image(path))
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {p}: no such file") from None
    except Exception as exc:
        raise ImageReadError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc


def mask_values(path: str | os.PathLike[str]) -> tuple[tuple[int, int], list[int]]:
    """``((H, W), sorted distinct values)`` of an index mask (palette or grey PNG)."""
    mask = read_label_png(path)
    counts = np.bincount(mask.reshape(-1), minlength=256)
    return mask.shape, [int(v) for v in np.flatnonzero(counts)]


def bad_values(values: Iterable[int], num_classes: int) -> list[int]:
    """Values that are neither ``0 … num_classes`` nor the ignore value 255."""
    return [v for v in values if not (0 <= v <= num_classes or v == IGNORE_INDEX)]


# --------------------------------------------------------------------------------------------------------------
# parallel work


def make_index(dataset: str, root: Path, class_names: Sequence[str], *, splits: Mapping[str, list[str]],
               files: Mapping[str, Any], labels: Mapping[str, list[int]], sizes: Mapping[str, Any],
               excluded: Mapping[str, Any], info: Mapping[str, Any], exif_transpose: bool = False,
               image_files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The index dict every ``prepare`` writes (format :data:`INDEX_FORMAT`, version :data:`INDEX_VERSION`)."""
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dataset": dataset,
        "root": str(root),
        "class_names": [str(c) for c in class_names],
        "exif_transpose": exif_transpose,
        "counts": {s: len(v) for s, v in splits.items()},
        "files": dict(files),
    }
    if image_files is not None:
        index["image_files"] = dict(image_files)
    index.update({"splits": dict(splits), "labels": dict(labels), "sizes": dict(sizes), "excluded": dict(excluded),
                  "info": dict(info)})
    return index


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int = 0,
    chunksize: int = 16,
    progress: ProgressFn | None = None,
    desc: str = "",
) -> Iterator[Any]:
    """``map(fn, items)`` in input order, in a process pool when ``workers > 1`` (``fn`` must be picklable).

    Items go to the workers in chunks of at most ``chunksize`` (smaller for short lists, so every worker gets
    some). ``progress(iterable, total, desc)`` may wrap the results (a tqdm bar). A worker's exception is
    re-raised here.
    """
    items = list(items)
    wrap: ProgressFn = progress or (lambda it, total, d: it)
    if workers <= 1 or len(items) < 2:
        yield from wrap(map(fn, items), len(items), desc)
        return
    n = min(workers, len(items))
    chunksize = max(1, min(chunksize, len(items) // (4 * n)))
    with multiprocessing.get_context().Pool(n) as pool:
        yield from wrap(pool.imap(fn, items, chunksize=chunksize), len(items), desc)
