"""Your own images with image-level tags (and, optionally, index masks for evaluation).

Labels file, one of:

* CSV ``image,classes`` — ``image`` is a path relative to the images folder, ``classes`` the tags separated by
  ``;`` or ``|`` (empty = no foreground class); a header row (``image,...``) is optional; blank lines and lines
  starting with ``#`` are skipped::

      image,classes
      beach.jpg,dog;person
      kitchen/0001.png,cat|bottle

* JSON ``{"beach.jpg": ["dog", "person"], "kitchen/0001.png": "cat;bottle"}``.

The class list is inferred (sorted unique tags) or given: a list of names, ``"voc"``, ``"coco"``, a comma list or
a ``.txt`` / ``.json`` file. An image listed without an extension (``"00000"``, as the ``labels.json`` that
``python -m excelseg.synthetic`` writes) is the one image file ``00000.<ext>`` in its folder. Tags are matched case-insensitively (for ``voc`` / ``coco`` the prompt names such as
``"bird avian"`` are accepted too) and unknown tags are an error naming each one with its line. Image ids are the
paths without their suffix; masks, when given, are ``<masks>/<id>.png`` with 0 = background, ``i + 1`` = the
i-th class, 255 = ignore. Images are read with their EXIF orientation applied, as ``excelseg cam`` reads them.
"""

from __future__ import annotations

import csv
import glob
import io as _io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..io.images import IMAGE_EXTENSIONS
from ..vocab import Vocabulary, normalize_name, parse_class_list
from . import index as idx
from .dataset import Sample, SegDataset
from .index import PrepareResult, Problem, ProgressFn, examples

__all__ = ["FolderDataset", "build_folder_index", "read_labels_file"]

SPLIT = "all"
_SEP = re.compile(r"[;|]")
_HEADER_WORDS = {"image", "images", "file", "filename", "file_name", "path", "name"}


def read_labels_file(path: str | os.PathLike[str]) -> list[tuple[str, list[str], int]]:
    """``[(image path, [tag, ...], line number), ...]`` from a CSV or JSON labels file (module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels file not found: {p}")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f'{p}: expected a JSON object {{"image.jpg": ["class", ...]}}')
        rows = []
        for image, tags in data.items():
            at = text.find(json.dumps(image)[:-1])  # the key's opening quote and text
            line = text.count("\n", 0, at) + 1 if at >= 0 else 0
            if isinstance(tags, str):
                tags = _SEP.split(tags)
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"{p}:{line}: the classes of {image!r} must be a list of names")
            rows.append((str(image), [t.strip() for t in tags if t.strip()], line))
        return rows
    rows = []
    first = True
    reader = csv.reader(_io.StringIO(text))
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) > 2:
            raise ValueError(f"{p}:{line}: expected 'image,classes' with classes separated by ';' or '|', "
                             f"got {len(row)} columns")
        image = row[0].strip()
        tags = [t.strip() for t in _SEP.split(row[1])] if len(row) > 1 else []
        if first and image.lower() in _HEADER_WORDS:
            first = False
            continue  # header row
        first = False
        rows.append((image, [t for t in tags if t], line))
    return rows


def _class_list(classes: str | Sequence[str] | None, rows: list[tuple[str, list[str], int]]
                ) -> tuple[list[str], dict[str, int]]:
    """Foreground names and a lookup normalised tag → label value (1 … C)."""
    if classes is None:
        spelling: dict[str, str] = {}  # normalised tag → its first spelling in the file
        for _, tags, _ in rows:
            for t in tags:
                spelling.setdefault(normalize_name(t), t)
        keys = sorted(spelling)
        return [spelling[k] for k in keys], {k: i + 1 for i, k in enumerate(keys)}
    if isinstance(classes, str) and classes.lower() in ("voc", "coco"):
        vocab = Vocabulary.named(classes)
        lookup = {}
        for i, (n, pn) in enumerate(zip(vocab.names, vocab.prompt_names)):
            lookup.setdefault(normalize_name(n), i + 1)
            lookup.setdefault(normalize_name(pn), i + 1)
        return list(vocab.names), lookup
    names = parse_class_list(classes)
    return names, {normalize_name(n): i + 1 for i, n in enumerate(names)}


def build_folder_index(
    images_dir: str | os.PathLike[str],
    labels_file: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str] | None = None,
    classes: str | Sequence[str] | None = None,
    check: bool = True,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Index of a folder of images with tags (split ``"all"``).

    With ``check`` every image header and mask is read: sizes are recorded, and images / masks that are missing,
    unreadable, of another size or with values outside 0 … C and 255 are problems (dropped from the split).
    Without it only the existence of the images is checked. Unknown tags and duplicate images are a
    ``ValueError`` either way.
    """
    images_dir = Path(images_dir).expanduser()
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    masks_path = Path(masks_dir).expanduser() if masks_dir is not None else None
    if masks_path is not None and not masks_path.is_dir():
        raise FileNotFoundError(f"masks folder not found: {masks_path}")
    rows = read_labels_file(labels_file)
    if not rows:
        raise ValueError(f"{labels_file}: no images listed")
    notes: list[str] = []
    if classes is None:  # the generator's own output: its class table gives the mask values
        classes = _generator_classes(Path(labels_file))
        if classes is not None:
            notes.append(f"class list: the {len(classes)} classes of the synthetic generator's dataset.json, in its "
                         "order (its masks' values)")
    names, lookup = _class_list(classes, rows)
    unknown = [f"{t!r} (line {line})" for _, tags, line in rows for t in tags if normalize_name(t) not in lookup]
    if unknown:
        raise ValueError(f"{labels_file}: unknown class names {examples(unknown, 8)}; known: "
                         f"{', '.join(names[:30])}{', …' if len(names) > 30 else ''}")

    problems: list[Problem] = []
    image_files: dict[str, str] = {}
    labels: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    dupes: list[str] = []
    ambiguous: dict[str, list[str]] = {}
    for image, tags, line in rows:
        rel = PurePosixPath(image.replace("\\", "/"))
        name = str(rel.with_suffix(""))
        if name in first_line:
            dupes.append(f"{image} (lines {first_line[name]} and {line})")
            continue
        first_line[name] = line
        image_files[name] = _with_extension(images_dir, rel, ambiguous, name)
        labels[name] = sorted({lookup[normalize_name(t)] for t in tags})
    if dupes:
        raise ValueError(f"{labels_file}: images listed twice (ids are paths without suffix): {examples(dupes)}")
    excluded: dict[str, str] = {}
    for name, found in ambiguous.items():
        excluded[name] = f"ambiguous: {', '.join(found)}"
    if ambiguous:
        problems.append(Problem(f"{len(ambiguous)} images of {labels_file} are listed without an extension and match "
                                f"several files (give the file name): {examples(list(ambiguous))}",
                                list(ambiguous)))
    missing = [n for n, rel in image_files.items() if n not in excluded and not (images_dir / rel).is_file()]
    if missing:
        for n in missing:
            excluded[n] = "image missing"
        problems.append(Problem(f"{len(missing)} images of {labels_file} are missing from {images_dir}: "
                                f"{examples([image_files[n] for n in missing])}", missing))
    if masks_path is not None:
        no_mask = [n for n in image_files if n not in excluded and not (masks_path / f"{n}.png").is_file()]
        if no_mask:
            for n in no_mask:
                excluded[n] = "mask missing"
            problems.append(Problem(f"{len(no_mask)} images have no mask <id>.png in {masks_path}: "
                                    f"{examples(no_mask)}", no_mask))

    sizes: dict[str, list[int]] = {}
    if check:
        tasks = [(n, str(images_dir / rel), str(masks_path / f"{n}.png") if masks_path else None)
                 for n, rel in image_files.items() if n not in excluded]
        errors: list[str] = []
        extra_classes = 0
        for n, hw, mask, error in idx.parallel_map(_check_one, tasks, workers, 32, progress, "images"):
            if error is None and mask is not None:
                mhw, values = mask
                if tuple(mhw) != tuple(hw):
                    error = f"mask {mhw[1]}x{mhw[0]}, image {hw[1]}x{hw[0]}"
                elif idx.bad_values(values, len(names)):
                    error = f"mask values outside 0-{len(names)} and 255: {idx.bad_values(values, len(names))}"
                elif {v for v in values if 1 <= v <= len(names)} - set(labels[n]):
                    extra_classes += 1
            if error is not None:
                errors.append(f"{n} ({error})")
                excluded[n] = error
            else:
                sizes[n] = list(hw)
        if errors:
            problems.append(Problem(f"{len(errors)} images or masks are unusable (excluded): "
                                    f"{examples(errors, 3)}"))
        if extra_classes:
            notes.append(f"{extra_classes} masks contain classes that their image's tags do not list")
    ids = [n for n in image_files if n not in excluded]
    root = images_dir.resolve()
    index = idx.make_index(
        "folder", root, names, splits={SPLIT: ids}, labels={n: labels[n] for n in ids}, sizes=sizes,
        files={SPLIT: {"image": [], "mask": [str(masks_path.resolve() / "{id}.png")] if masks_path else []}},
        excluded=excluded, info={"labels_file": str(Path(labels_file).resolve())}, exif_transpose=True,
        image_files={n: image_files[n] for n in ids})
    return PrepareResult(index, problems, notes)


def _generator_classes(labels_file: Path) -> list[str] | None:
    """The class names of ``dataset.json`` next to ``labels_file`` when ``python -m excelseg.synthetic`` wrote
    both (format ``excelseg-synthetic/1``), else None."""
    meta = labels_file.parent / "dataset.json"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        if data.get("format") == "excelseg-synthetic/1":
            return [str(c["name"]) for c in data["classes"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _with_extension(images_dir: Path, rel: PurePosixPath, ambiguous: dict[str, list[str]], name: str) -> str:
    """``rel`` as listed; for a listed name without an image extension that is no file (e.g. ``00000`` in the
    ``labels.json`` of ``python -m excelseg.synthetic``), the one image file ``<rel>.<extension>`` there is.
    Several such files: recorded in ``ambiguous`` under ``name`` (the image is then left out, reported)."""
    if rel.suffix.lower() in IMAGE_EXTENSIONS or (images_dir / rel).is_file():
        return str(rel)
    folder = images_dir / rel.parent
    found = sorted(p.name for p in folder.glob(f"{glob.escape(rel.name)}.*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem == rel.name and p.is_file()) \
        if folder.is_dir() else []
    if len(found) == 1:
        return str(rel.parent / found[0]) if str(rel.parent) != "." else found[0]
    if len(found) > 1:
        ambiguous[name] = found
    return str(rel)


def _check_one(task: tuple[str, str, str | None]) -> tuple[str, Any, Any, str | None]:
    name, image_path, mask_path = task
    try:
        hw = idx.image_size(image_path, exif_transpose=True)
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, None, None, f"unreadable image: {type(exc).__name__}: {exc}"
    if mask_path is None:
        return name, hw, None, None
    try:
        return name, hw, idx.mask_values(mask_path), None
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, hw, None, f"unreadable mask: {exc}"


class FolderDataset(SegDataset):
    """A :class:`SegDataset` over your own images, straight from a labels file (no ``prepare`` needed).

    Args:
        images_dir: folder the labels file's image paths are relative to.
        labels_file: CSV or JSON labels file (see the module docstring).
        masks_dir: optional folder of ``<id>.png`` index masks (for evaluation).
        classes: class list (names, ``"voc"``, ``"coco"``, comma list or file); default: sorted unique tags.
        transform, with_mask: as for :class:`SegDataset`.

    Raises:
        FileNotFoundError: a folder, the labels file or a listed image is missing (all missing ones named).
        ValueError: unknown class names (each with its line), duplicate images, a malformed labels file.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        labels_file: str | os.PathLike[str],
        masks_dir: str | os.PathLike[str] | None = None,
        classes: str | Sequence[str] | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        with_mask: bool = True,
    ) -> None:
        result = build_folder_index(images_dir, labels_file, masks_dir, classes, check=False)
        if result.problems:
            raise FileNotFoundError(str(result.problems[0]))
        super().__init__(result.index, SPLIT, transform=transform, with_mask=with_mask)
