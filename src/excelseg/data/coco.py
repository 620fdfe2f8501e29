"""MS-COCO: VOC-style index masks from instance annotations, and the dataset index (EXCEL_SPEC §7).

Masks (``<out-masks>/<split>/<12-digit id>.png``, default ``<ROOT>/SegmentationClass/{train,val}``, the
reference's layout): palette PNGs with 0 = background, ``1 … K`` = the categories sorted by category id (the
standard 80-class order for COCO), 255 = ignore. Instances are rasterised with ``pycocotools`` at the image size
given in the annotation file, so polygon parts outside the image are clipped.

Overlap rule (pixels claimed by several annotations):

1. crowd regions (``iscrowd = 1``) are painted first, as 255;
2. non-crowd instances are painted on top in order of decreasing pixel area (ties: annotation order), so where
   instances overlap the **smaller one wins** and small objects stay visible; a crowd region therefore stays 255
   only where no non-crowd instance covers it.

Lists: ``train`` / ``val`` hold the images that have at least one annotation (crowd-only images included, with
their 255 regions), sorted by image id — the reference's 82,081 / 40,137 of COCO 2014. Images without any
annotation still get an all-background mask but are left out of the lists (counted in the index ``info``).
``val_part`` = the first 5,000 ids of that sorted ``val`` list (the reference's in-training validation subset;
its own list file is not derivable, so id order is the documented, reproducible choice).

Image-level labels (``labels_from``):

* ``"annotations"`` (default): the categories of every annotation of the image in the instance JSON, crowd
  annotations included — what the field's COCO label files are built from (every ``category_id`` of the image's
  annotations, as ``getAnnIds(imgIds=i)`` returns them, crowd included);
* ``"mask"``: the foreground values present in the written mask. They differ from the annotations where an
  instance is completely hidden under smaller ones, where a category has only crowd annotations on the image
  (painted 255), or where a segmentation is empty.

The number of images on which the two differ is reported per split (both directions; the mask cannot hold a
category that is not annotated, so the second count is 0 unless the masks came from elsewhere), and the index
``info`` records ``label_source`` per split and the differing ids (``label_disagreements``).

Runs are resumable: an existing mask that reads back with the right size and valid
values is kept (``overwrite`` redoes it); a truncated or wrong one is rewritten; every write is atomic, and
temporary files left by a killed run are removed at the start.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..io.files import read_label_png, remove_stale_temps, save_label_png
from ..io.palette import IGNORE_INDEX
from . import index as idx
from .index import DatasetUnusableError, PrepareResult, Problem, ProgressFn, examples
from .labels import coco_key, read_label_file

__all__ = ["LABEL_SOURCES", "MISSING_PYCOCOTOOLS", "OVERLAP_RULE", "build_coco_index", "rasterize_instances", "require_pycocotools"]

MISSING_PYCOCOTOOLS = "install the coco extra: pip install 'excelseg[coco]'"
OVERLAP_RULE = ("crowd regions = 255 first; non-crowd instances on top by decreasing area "
                "(the smaller instance wins where they overlap)")
VAL_PART = 5000
LABEL_SOURCES = ("annotations", "mask")
ID_DIGITS = 12


def require_pycocotools() -> Any:
    """``pycocotools.mask``, or ``ImportError`` with the one-line install hint."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError(MISSING_PYCOCOTOOLS) from None
    return mask_utils


def _decode(mask_utils: Any, segm: Any, h: int, w: int) -> np.ndarray | None:
    if isinstance(segm, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polys = [[float(v) for v in p] for p in segm if len(p) >= 6]
        if not polys:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segm, dict) and "counts" in segm:
        size = [int(v) for v in segm.get("size", (h, w))]
        if size != [h, w]:
            raise ValueError(f"RLE of size {size[1]}x{size[0]} for an image of {w}x{h}")
        rle = mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
    else:
        raise ValueError(f"unknown segmentation format {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation, raised inside its decode
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), dtype=bool)


def rasterize_instances(instances: list[tuple[int, bool, Any]], height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 label map from ``[(label value, iscrowd, segmentation), ...]`` by the overlap rule."""
    mask_utils = require_pycocotools()
    label = np.zeros((height, width), dtype=np.uint8)
    painted = []
    for order, (value, crowd, segm) in enumerate(instances):
        m = _decode(mask_utils, segm, height, width)
        if m is None:
            continue
        if crowd:
            label[m] = IGNORE_INDEX
        else:
            painted.append((-int(m.sum()), order, value, m))
    for _, _, value, m in sorted(painted, key=lambda t: (t[0], t[1])):
        label[m] = value
    return label


def _mask_task(task: tuple[str, int, int, str, list[tuple[int, bool, Any]], int, bool]) -> tuple[str, str, Any]:
    """Worker: write (or keep) one mask; ``(id, status, label values or error)``."""
    name, h, w, out, instances, num_classes, overwrite = task
    status = "written"
    if os.path.exists(out):
        if not overwrite:
            try:
                mask = read_label_png(out)
            except ValueError:  # unreadable / truncated (ImageReadError) or not an index PNG: made again
                mask = None
            if mask is not None:
                values = [int(v) for v in np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256))]
                if mask.shape == (h, w) and not idx.bad_values(values, num_classes):
                    return name, "kept", [v for v in values if 1 <= v <= num_classes]
            status = "replaced"
        else:
            status = "overwritten"
    try:
        label = rasterize_instances(instances, h, w)
        save_label_png(out, label)
    except Exception as exc:  # noqa: BLE001 (a bad annotation fails its image, not the run)
        return name, "error", f"{type(exc).__name__}: {exc}"
    values = np.flatnonzero(np.bincount(label.reshape(-1), minlength=256))
    return name, status, [int(v) for v in values if 1 <= v <= num_classes]


def _compare_labels(ann: dict[str, list[int]], mask: dict[str, list[int]], ids: set[str],
                    names: list[str]) -> tuple[str, dict[str, dict[str, list[int]]]]:
    """A note on the listed images whose annotated categories and mask classes differ, and the differences."""
    common = [i for i in sorted(ids) if i in ann and i in mask]
    only_ann = {i: sorted(set(ann[i]) - set(mask[i])) for i in common if set(ann[i]) - set(mask[i])}
    only_mask = {i: sorted(set(mask[i]) - set(ann[i])) for i in common if set(mask[i]) - set(ann[i])}
    detail = {"not_in_mask": only_ann, "not_in_annotations": only_mask}
    n = len(set(only_ann) | set(only_mask))
    if not n:
        return f"annotated categories and mask classes agree on all {len(ids)} listed images", detail
    parts = []
    hidden = "annotated categories not visible in the mask (hidden under other instances, crowd-only or empty)"
    for diff, what in ((only_ann, hidden), (only_mask, "mask classes not annotated")):
        if diff:
            shown = [f"{i}: {','.join(names[v - 1] for v in vals)}" for i, vals in diff.items()]
            parts.append(f"{len(diff)} with {what}, e.g. {examples(shown, 3)}")
    text = f"annotated categories differ from mask classes on {n} of {len(ids)} listed images: " + "; ".join(parts)
    return text, detail


def _split_of(path: Path, images: list[dict[str, Any]]) -> str:
    stem = path.stem.lower()
    for split in ("train", "val"):
        if split in stem:
            return split
    found = {m.group(1) for im in images[:100] if (m := re.search(r"(train|val)20\d\d", str(im.get("file_name"))))}
    if len(found) == 1:
        return found.pop()
    raise ValueError(f"cannot tell whether {path} is train or val annotation: name it instances_train*.json "
                     "or instances_val*.json")


def _load_annotations(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read annotation file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path} is not a COCO instance annotation file (needs images, annotations, categories)")
    return data


def _image_layout(root: Path, split: str, images: list[dict[str, Any]]) -> tuple[str | None, int]:
    """Folder (relative to root) holding the split's images and how many of them are missing there."""
    names = [str(im["file_name"]) for im in images]
    candidates = [f"JPEGImages/{split}", f"{split}2014", f"{split}2017", f"images/{split}2014",
                  f"images/{split}2017", split]
    best, best_found = None, -1
    for c in candidates:
        d = root / c
        if not d.is_dir():
            continue
        present = {e.name for e in os.scandir(d)}
        found = sum(n in present for n in names)
        if found > best_found:
            best, best_found = c, found
    if best is None:
        return None, len(names)
    return best, len(names) - best_found


def build_coco_index(
    root: str | os.PathLike[str],
    annotations: list[str | os.PathLike[str]],
    out_masks: str | os.PathLike[str] | None = None,
    workers: int = 0,
    val_part: int = VAL_PART,
    overwrite: bool = False,
    merge_with: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    labels_from: str = "annotations",
    labels_file: str | os.PathLike[str] | None = None,
) -> PrepareResult:
    """Write the masks of every image of the annotation files and build the index (module docstring).

    Args:
        root: COCO root (images in ``JPEGImages/{train,val}`` or ``{train,val}2014``; detected per split).
        annotations: instance annotation files (``instances_train2014.json``, ``instances_val2014.json``).
        out_masks: mask folder (default ``<root>/SegmentationClass``); masks go to ``<out_masks>/<split>/``.
        workers: processes rasterising masks (0/1 = in this process).
        val_part: size of ``val_part`` (first ids of the sorted ``val`` list).
        overwrite: redo masks that already exist.
        merge_with: an existing index whose other splits are kept (one split prepared at a time).
        labels_from: ``"annotations"`` (categories annotated on the image, crowd included; default) or
            ``"mask"`` (classes visible in the written mask).
        labels_file: ready-made labels (``cls_labels_onehot.npy``: dict ``COCO_train2014_<12 digits>`` or id →
            ``(K,)`` vector; or a CSV / JSON of ``prepare folder``), used for the images it lists.
    """
    if labels_from not in LABEL_SOURCES:
        raise ValueError(f"labels_from must be one of {', '.join(LABEL_SOURCES)}, got {labels_from!r}")
    require_pycocotools()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root not found: {root} is not a directory")
    if not annotations:
        raise DatasetUnusableError("give at least one annotation file (--annotations instances_train2014.json)")
    mask_root = Path(out_masks).expanduser() if out_masks is not None else root / "SegmentationClass"
    problems: list[Problem] = []
    notes: list[str] = []
    index: dict[str, Any] = {}
    if merge_with is not None and Path(merge_with).is_file():
        try:
            old = idx.load_index(merge_with)
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("dataset") == "coco" and Path(old["root"]) == root.resolve():
            index = old
    categories: list[dict[str, Any]] | None = None
    file_labels: dict[str, list[int]] | None = None
    done_splits: dict[str, Path] = {}
    seen_ids: set[str] = set()
    for ann_path in map(Path, annotations):
        data = _load_annotations(ann_path)
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        split = _split_of(ann_path, images)
        if split in done_splits:
            raise ValueError(f"{ann_path} and {done_splits[split]} are both {split} annotations")
        done_splits[split] = ann_path
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        if categories is None:
            categories = cats
            if index and index.get("class_names") != [str(c["name"]) for c in cats]:
                notes.append(f"the existing index {merge_with} has other categories: it is replaced, not merged")
                index = {}
        elif [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in categories]:
            raise ValueError(f"{ann_path} has different categories from {next(iter(done_splits.values()))}")
        value_of = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        if labels_file is not None and file_labels is None:
            file_labels = read_label_file(labels_file, [str(c["name"]) for c in cats], coco_key)
        if len(cats) > 254:
            raise ValueError(f"{ann_path} has {len(cats)} categories; index masks hold at most 254")

        by_image: dict[int, list[tuple[int, bool, Any]]] = defaultdict(list)
        image_ids = {int(im["id"]) for im in images}
        stray, unknown_cat = 0, set()
        for ann in data["annotations"]:
            iid, cid = int(ann["image_id"]), int(ann["category_id"])
            if iid not in image_ids:
                stray += 1
                continue
            if cid not in value_of:
                unknown_cat.add(cid)
                continue
            by_image[iid].append((value_of[cid], bool(ann.get("iscrowd", 0)), ann["segmentation"]))
        if stray:
            problems.append(Problem(f"{ann_path.name}: {stray} annotations name images not in the file (skipped)"))
        if unknown_cat:
            problems.append(Problem(f"{ann_path.name}: annotations with unknown category ids "
                                    f"{sorted(unknown_cat)} (skipped)"))
        del data

        split_dir = mask_root / split
        split_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(split_dir)
        if stale:
            notes.append(f"removed {stale} temporary files left by an interrupted run in {split_dir}")
        tasks = []
        for im in images:
            name = f"{int(im['id']):0{ID_DIGITS}d}"
            tasks.append((name, int(im["height"]), int(im["width"]), str(split_dir / f"{name}.png"),
                          by_image.get(int(im["id"]), []), len(cats), overwrite))
        counts: dict[str, int] = defaultdict(int)
        mask_labels: dict[str, list[int]] = {}
        failed: list[str] = []
        for name, status, result in idx.parallel_map(_mask_task, tasks, workers, 16, progress, f"{split} masks"):
            counts[status] += 1
            if status == "error":
                failed.append(f"{name} ({result})")
            else:
                mask_labels[name] = result
        ann_labels = {t[0]: sorted({v for v, _, _ in t[4]}) for t in tasks if t[0] in mask_labels}
        labels = ann_labels if labels_from == "annotations" else mask_labels
        listed_ids = {t[0] for t in tasks if t[4]}
        diff_text, diff = _compare_labels(ann_labels, mask_labels, listed_ids, [str(c["name"]) for c in cats])
        source = "annotated categories" if labels_from == "annotations" else "mask classes"
        notes.append(f"{split}: image-level labels from the {source}; {diff_text}")
        from_file = 0
        if file_labels is not None:
            labels = dict(labels)
            given = {i: v for i, v in file_labels.items() if i in labels}
            labels.update(given)
            from_file = sum(i in given for i in listed_ids)
            differ = sum(set(given[i]) != set(ann_labels[i]) for i in given if i in listed_ids)
            notes.append(f"{split}: labels file {labels_file}: {from_file} of {len(listed_ids)} listed images "
                         f"labelled from it; it differs from the annotated categories on {differ}")
        if failed:
            problems.append(Problem(f"{len(failed)} {split} masks could not be made: {examples(failed, 3)}"))
        notes.append(f"{split}: {len(tasks)} images; masks " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                     + f" in {split_dir}")

        listed = [t[0] for t in tasks if t[4] and t[0] in mask_labels]
        empty = sum(1 for t in tasks if not t[4])
        if empty:
            notes.append(f"{split}: {empty} images without annotations get an all-background mask "
                         f"but are left out of the {split} list")
        layout, n_missing = _image_layout(root, split, images)
        if layout is None:
            problems.append(Problem(f"{split} images not found: looked for {root}/JPEGImages/{split}/ and "
                                    f"{root}/{split}2014/ (masks and lists are written all the same)"))
        elif n_missing:
            problems.append(Problem(f"{n_missing} of {len(images)} {split} images are missing from {root / layout} "
                                    "(they stay in the lists: add them before using the dataset)"))

        image_files = None
        first = images[0] if images else None
        template = None
        if first is not None:
            fid = f"{int(first['id']):0{ID_DIGITS}d}"
            if fid in str(first["file_name"]):
                template = str(first["file_name"]).replace(fid, "{id}")
                if any(template.replace("{id}", f"{int(im['id']):0{ID_DIGITS}d}") != im["file_name"]
                       for im in images):
                    template = None
            if template is None:
                image_files = {f"{int(im['id']):0{ID_DIGITS}d}": f"{layout or split}/{im['file_name']}"
                               for im in images}
        try:  # relative to the root when the masks live under it (the index then survives a move)
            mask_tmpl = str(split_dir.resolve().relative_to(root.resolve()) / "{id}.png")
        except ValueError:
            mask_tmpl = str(split_dir.resolve() / "{id}.png")
        image_tmpl = [f"{layout or split}/{template}"] if template else []
        files = {"image": image_tmpl, "mask": [mask_tmpl]}

        for key in ("splits", "files", "labels", "sizes", "image_files", "info"):
            index.setdefault(key, {})
        # an earlier run of this split (merged index): forget what it recorded
        previous = set(index["splits"].get(split, [])) | {t[0] for t in tasks}
        for key in ("labels", "sizes", "image_files"):
            index[key] = {k: v for k, v in index[key].items() if k not in previous}
        clash = [t[0] for t in tasks if t[0] in seen_ids]
        if clash:
            raise ValueError(f"image ids of {ann_path} also occur in another annotation file: {examples(clash)}")
        seen_ids.update(t[0] for t in tasks)
        index["splits"][split] = listed
        index["files"][split] = files
        if split == "val":
            index["splits"]["val_part"] = listed[:val_part]
            index["files"]["val_part"] = files
        index["labels"].update(labels)
        index["sizes"].update({t[0]: [t[1], t[2]] for t in tasks})
        if image_files:
            index["image_files"].update(image_files)
        info = index["info"]
        info.setdefault("annotations", {})[split] = str(ann_path.resolve())
        info.setdefault("image_layout", {})[split] = layout
        info.setdefault("without_annotations", {})[split] = empty
        split_source = ("annotations (categories of every annotation, crowd included)"
                        if labels_from == "annotations" else "masks (classes visible in the mask)")
        if from_file:
            split_source = (f"labels file ({from_file} images)" + ("" if from_file == len(listed_ids)
                                                                   else f", else {split_source}"))
        info.setdefault("label_source", {})[split] = split_source
        if labels_file is not None:
            info["labels_file"] = str(Path(labels_file).expanduser().resolve())
        info.setdefault("label_disagreements", {})[split] = diff
        info["overlap_rule"] = OVERLAP_RULE
        info["val_part"] = f"first {val_part} ids of the val list sorted by image id"

    assert categories is not None
    splits = index["splits"]
    result = idx.make_index("coco", root.resolve(), [c["name"] for c in categories], splits=splits, files=index["files"],
                        labels=dict(sorted(index["labels"].items())), sizes=dict(sorted(index["sizes"].items())),
                        excluded={}, info=index["info"], image_files=index["image_files"] or None)
    if not any(splits.values()):
        raise DatasetUnusableError("no image with annotations in the given files")
    return PrepareResult(result, problems, notes)
