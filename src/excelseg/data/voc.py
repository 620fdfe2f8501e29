"""PASCAL VOC 2012: check a VOCdevkit tree and write its index (EXCEL_SPEC §7).

Expected layout (``ROOT`` = ``VOCdevkit/VOC2012``; its parent ``VOCdevkit`` or the folder holding ``VOCdevkit``
are accepted too)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png           VOC masks (train + val, 2,913)
    SegmentationClassAug/<id>.png        optional: SBD-augmented masks (12,031 = train_aug + val)
    ImageSets/Segmentation/{train,val,trainval,test}.txt
    Annotations/<id>.xml                 VOC XML annotations (every VOC 2012 trainval download has them)

Splits: the ImageSets lists as given, and ``train_aug`` = every SegmentationClassAug id not in ``val`` (10,582 on
the real data). Masks are looked up SegmentationClassAug first, else SegmentationClass, when the tree is checked
and when the dataset is read.

Image-level labels (every image with a usable mask) follow the field's convention (the ``cls_labels`` files of
PSA / IRN / ToCo / ExCEL): the classes of ``Annotations/<id>.xml`` — every ``<object>``'s ``<name>`` that is one of
the 20 classes, difficult and truncated objects included, part names ignored. SBD masks leave objects out, so
mask-derived labels lose a class on ~7.7 % of train_aug images (817 images of the 12,031 differ). Where there is no
annotation (folder absent, XML missing or malformed) the mask's foreground values are used, and the summary says so
with the number of images. ``labels_file`` (``cls_labels_onehot.npy``, ``cls_labels.npy``, or a CSV of ``prepare
folder``) overrides both for the images it lists; ``labels_from="mask"`` restores mask-derived labels. The index
``info`` records each split's label source (``label_source``) and the disagreements between annotations, masks and
the labels file in both directions (``label_disagreements``).

Images whose mask is unreadable, differs in size from the image or holds values other than 0–20 and 255, and list
entries whose image is missing, are reported and dropped from every split (``excluded`` in the index).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..vocab import VOC_CLASSES, VOC_PROMPT_NAMES
from . import index as idx
from .index import DatasetUnusableError, PrepareResult, Problem, ProgressFn, examples
from .labels import read_label_file, read_voc_annotation, voc_key

__all__ = ["LABEL_SOURCES", "LIST_NAMES", "build_voc_index", "find_voc_root"]

LIST_NAMES = ("train", "val", "trainval", "test")
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
AUG_DIR = "SegmentationClassAug"
LIST_DIR = "ImageSets/Segmentation"
ANN_DIR = "Annotations"
LABEL_SOURCES = ("annotations", "mask")
_SOURCE_TEXT = {"labels file": "the labels file", "annotations": f"{ANN_DIR}/*.xml", "masks": "the masks"}
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


def _read_annotation(path: str | None) -> tuple[str, Any]:
    """``("ok", (values, unknown names))``, ``("missing", None)``, ``("bad", message)`` or ``("none", None)``."""
    if path is None:
        return "none", None
    if not os.path.isfile(path):
        return "missing", None
    try:
        return "ok", read_voc_annotation(path, VOC_CLASSES)
    except (OSError, ValueError) as exc:
        return "bad", str(exc)


def _scan_one(task: tuple[str, str, str | None, str | None]) -> tuple[str, Any, Any, str | None, Any]:
    """Worker: ``(id, image size, (mask size, values) or None, error or None, annotation result)``."""
    name, image_path, mask_path, ann_path = task
    try:
        hw = idx.image_size(image_path)
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, None, None, f"unreadable image {image_path}: {type(exc).__name__}: {exc}", None
    if mask_path is None:
        return name, hw, None, None, None
    ann = _read_annotation(ann_path)
    try:
        return name, hw, idx.mask_values(mask_path), None, ann
    except Exception as exc:  # noqa: BLE001 (reported per file)
        return name, hw, None, f"unreadable mask {mask_path}: {exc}", None


def build_voc_index(
    path: str | os.PathLike[str],
    workers: int = 0,
    progress: ProgressFn | None = None,
    labels_file: str | os.PathLike[str] | None = None,
    labels_from: str = "annotations",
) -> PrepareResult:
    """Check a VOC tree and build its index (see the module docstring). Nothing is written.

    Args:
        path: ``VOC2012``, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
        workers: processes reading images, masks and annotations (0/1 = in this process).
        labels_file: ready-made image-level labels (``cls_labels_onehot.npy``, ``cls_labels.npy``, or the CSV /
            JSON of ``prepare folder``); they take precedence for the images they list.
        labels_from: ``"annotations"`` (``Annotations/<id>.xml``, the field's convention; the masks where there
            is none) or ``"mask"`` (the foreground values of each mask).

    Raises:
        DatasetUnusableError: no VOC folder, or JPEGImages / ImageSets/Segmentation / every mask folder missing.
        LabelFileError: the labels file is unusable (unsafe pickle, wrong layout, unknown classes).
    """
    if labels_from not in LABEL_SOURCES:
        raise ValueError(f"labels_from must be one of {', '.join(LABEL_SOURCES)}, got {labels_from!r}")
    root = find_voc_root(path)
    image_dir, mask_dir, aug_dir, list_dir = root / IMAGE_DIR, root / MASK_DIR, root / AUG_DIR, root / LIST_DIR
    ann_dir = root / ANN_DIR
    missing = [d for d in (IMAGE_DIR, LIST_DIR) if not (root / d).is_dir()]
    if not mask_dir.is_dir() and not aug_dir.is_dir():
        missing.append(f"{MASK_DIR} (and {AUG_DIR})")
    if missing:
        raise DatasetUnusableError(f"{root} is not usable: missing {', '.join(missing)}")

    notes: list[str] = []
    problems: list[Problem] = []
    file_labels = None
    if labels_file is not None:  # read first: a bad file stops before the long scan
        file_labels = read_label_file(labels_file, VOC_CLASSES, voc_key, VOC_PROMPT_NAMES)
    images = _stems(image_dir, ".jpg")
    seg_ids = _stems(mask_dir, ".png")
    aug_ids = _stems(aug_dir, ".png")
    notes.append(f"{IMAGE_DIR}: {len(images)} images; {MASK_DIR}: "
                 + (f"{len(seg_ids)} masks" if mask_dir.is_dir() else "not found")
                 + f"; {AUG_DIR}: " + (f"{len(aug_ids)} masks" if aug_dir.is_dir() else "not found"))
    if not aug_dir.is_dir():
        notes.append(f"{AUG_DIR} not found: train_aug will not be available; see docs/datasets.md for SBD")
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
    tasks = [(i, str(image_dir / f"{i}.jpg"), str(mask_of[i]) if i in mask_of else None,
              str(ann_dir / f"{i}.xml") if ann_dir.is_dir() else None)
             for i in sorted(wanted - set(no_image))]

    mask_labels: dict[str, list[int]] = {}
    annotations: dict[str, tuple[str, Any]] = {}
    sizes: dict[str, list[int]] = {}
    unreadable: list[str] = []
    size_errors: list[tuple[str, str]] = []
    value_errors: list[tuple[str, str]] = []
    for name, hw, mask, error, ann in idx.parallel_map(_scan_one, tasks, workers, 32, progress, "masks"):
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
        bad = idx.bad_values(values, NUM_CLASSES)
        if bad:
            value_errors.append((name, f"{mask_of[name]}: {', '.join(map(str, bad))}"))
            excluded[name] = f"mask values outside 0-{NUM_CLASSES} and 255: {bad}"
            continue
        mask_labels[name] = [v for v in values if 1 <= v <= NUM_CLASSES]
        annotations[name] = ann
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

    labels, label_info = _choose_labels(mask_labels, annotations, file_labels, labels_file, labels_from,
                                        ann_dir.is_dir(), splits, problems, notes)

    mask_templates = [f"{d}/{{id}}.png" for d in (AUG_DIR, MASK_DIR) if (root / d).is_dir()]
    files = {s: {"image": [f"{IMAGE_DIR}/{{id}}.jpg"], "mask": [] if s == "test" else mask_templates}
             for s in splits}
    index = idx.make_index("voc", root.resolve(), VOC_CLASSES, splits=splits, files=files, labels=labels, sizes=sizes,
                       excluded=dict(sorted(excluded.items())),
                       info={"masks": f"{AUG_DIR} preferred, else {MASK_DIR}", **label_info})
    return PrepareResult(index, problems, notes)


def _class_text(values: list[int]) -> str:
    return ",".join(VOC_CLASSES[v - 1] for v in values)


def _compare(a: dict[str, list[int]], b: dict[str, list[int]], a_name: str, b_name: str,
             splits: dict[str, list[str]]) -> tuple[str, dict[str, dict[str, list[int]]]]:
    """A note on where labels ``a`` and ``b`` differ (both directions) and the differences per image."""
    common = [i for i in a if i in b]
    only_a = {i: sorted(set(a[i]) - set(b[i])) for i in common if set(a[i]) - set(b[i])}
    only_b = {i: sorted(set(b[i]) - set(a[i])) for i in common if set(b[i]) - set(a[i])}
    differ = set(only_a) | set(only_b)
    detail = {f"not_in_{b_name.replace(' ', '_')}": dict(sorted(only_a.items())),
              f"not_in_{a_name.replace(' ', '_')}": dict(sorted(only_b.items()))}
    if not differ:
        return f"{a_name} labels and {b_name} classes agree on all {len(common)} images", detail
    per_split = ", ".join(f"{s} {n}" for s, ids in splits.items() if (n := len(differ.intersection(ids))))
    parts = []
    for diff, what in ((only_a, f"{a_name} classes absent from the {b_name}"),
                       (only_b, f"{b_name} classes absent from the {a_name}")):
        if diff:
            shown = [f"{i}: {_class_text(v)}" for i, v in sorted(diff.items())]
            parts.append(f"{len(diff)} with {what} ({examples(shown, 3)})")
    return (f"{a_name} labels differ from {b_name} classes on {len(differ)} of {len(common)} images "
            f"({per_split}): " + "; ".join(parts)), detail


def _choose_labels(
    mask_labels: dict[str, list[int]],
    annotations: dict[str, tuple[str, Any]],
    file_labels: dict[str, list[int]] | None,
    labels_file: str | os.PathLike[str] | None,
    labels_from: str,
    have_annotations: bool,
    splits: dict[str, list[str]],
    problems: list[Problem],
    notes: list[str],
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Image-level labels of every image with a usable mask: the labels file, else its annotation XML (when
    ``labels_from == "annotations"``), else its mask. Reports what came from where and the disagreements;
    returns ``(labels, index info)``."""
    ann_labels: dict[str, list[int]] = {}
    bad_xml: list[str] = []
    no_xml: list[str] = []
    unknown: dict[str, list[str]] = {}
    for name, (status, payload) in annotations.items():
        if status == "ok":
            values, names = payload
            ann_labels[name] = values
            for n in names:
                unknown.setdefault(n, []).append(name)
        elif status == "bad":
            bad_xml.append((name, f"{ANN_DIR}/{name}.xml ({payload})"))
        elif status == "missing":
            no_xml.append(name)
    if bad_xml:
        problems.append(Problem(f"{len(bad_xml)} annotation XMLs are unusable (those images' labels come from "
                                f"their masks): {examples([t for _, t in bad_xml], 3)}", [i for i, _ in bad_xml]))
    if unknown:
        shown = [f"{n!r} ({examples(ids, 2)})" for n, ids in sorted(unknown.items())]
        ids = sorted({i for v in unknown.values() for i in v})
        problems.append(Problem(f"{len(ids)} annotation XMLs name objects outside the {NUM_CLASSES} VOC classes "
                                f"(ignored): {examples(shown, 5)}", ids))

    labels: dict[str, list[int]] = {}
    source: dict[str, str] = {}
    for name, values in mask_labels.items():
        if file_labels is not None and name in file_labels:
            labels[name], source[name] = file_labels[name], "labels file"
        elif labels_from == "annotations" and name in ann_labels:
            labels[name], source[name] = ann_labels[name], "annotations"
        else:
            labels[name], source[name] = values, "masks"

    counts: dict[str, dict[str, int]] = {}
    split_source: dict[str, str] = {}
    for s, ids in splits.items():
        used = {k: n for k in ("labels file", "annotations", "masks")
                if (n := sum(source.get(i) == k for i in ids))}
        counts[s] = used
        split_source[s] = ("none" if not used else next(iter(used)) if len(used) == 1
                           else "mixed (" + ", ".join(f"{k} {n}" for k, n in used.items()) + ")")
    total = {k: sum(v == k for v in source.values()) for k in ("labels file", "annotations", "masks")}
    notes.append("image-level labels: " + ", ".join(f"{n} from {_SOURCE_TEXT[k]}" for k, n in total.items() if n)
                 + "; by split: " + ", ".join(f"{s} {v}" for s, v in split_source.items()))
    from_masks = sorted(i for i, k in source.items() if k == "masks")
    if labels_from == "annotations" and from_masks:
        if not have_annotations:
            notes.append(f"{ANN_DIR}/ not found: the labels of {len(from_masks)} images come from their masks, "
                         f"which leave objects out (SBD masks: ~7.7 % of train_aug images lose a class); the "
                         f"field's labels come from {ANN_DIR}/*.xml (VOC2012 trainval download) or "
                         "cls_labels_onehot.npy (--labels)")
        elif no_xml:
            missing = [i for i in from_masks if i in set(no_xml)]
            if missing:
                notes.append(f"{len(missing)} images have no {ANN_DIR}/<id>.xml: their labels come from their "
                             f"masks ({examples(missing)})")
    elif labels_from == "mask":
        notes.append("labels taken from the masks (--labels-from mask): not the field's convention for VOC")

    info: dict[str, Any] = {"label_source": split_source, "label_source_counts": counts, "labels_from": labels_from}
    if from_masks and labels_from == "annotations":
        info["labels_from_masks"] = from_masks
    disagreements: dict[str, Any] = {}
    if ann_labels:
        text, detail = _compare(ann_labels, mask_labels, "annotation", "mask", splits)
        notes.append(text)
        disagreements["annotations_vs_masks"] = detail
    if file_labels is not None:
        given = {i: v for i, v in file_labels.items() if i in mask_labels}
        left = sorted(set(mask_labels) - set(file_labels))
        extra = sorted(set(file_labels) - set(mask_labels))
        notes.append(f"labels file {labels_file}: {len(given)} of {len(mask_labels)} images labelled from it"
                     + (f"; {len(left)} not in it ({examples(left)})" if left else "")
                     + (f"; {len(extra)} of its entries are not images of this dataset with a mask "
                        f"({examples(extra)})" if extra else ""))
        text, detail = _compare(given, mask_labels, "labels file", "mask", splits)
        notes.append(text)
        disagreements["labels_file_vs_masks"] = detail
        if ann_labels:
            text, detail = _compare(given, ann_labels, "labels file", "annotation", splits)
            notes.append(text)
            disagreements["labels_file_vs_annotations"] = detail
        info["labels_file"] = str(Path(labels_file).expanduser().resolve())  # type: ignore[arg-type]
    if disagreements:
        info["label_disagreements"] = disagreements
    return dict(sorted(labels.items())), info
