"""Scoring files on disk against a prepared dataset's ground truth (``excelseg eval`` / ``eval-cams``).

Workers read prediction PNGs or CAM archives with their GT masks in chunks and return confusion matrices
(EXCEL_SPEC §6: confusion over GT pixels that are not 255); the commands add them up and print the tables.
Every file that cannot be scored raises :class:`EvalInputError` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data.index import examples, parallel_map
from .io.cams import read_cam_archive
from .io.files import read_label_png
from .metrics import SegmentationMetric

SHOW = 5  # ids named in an error message
CHUNK = 32  # images per worker task


class EvalInputError(ValueError):
    """A prediction or ground-truth file that cannot be scored; the message names it."""


def find_inputs(ds, folder: Path, suffix: str, what: str, allow_missing: bool) -> tuple[list[tuple], list[str]]:
    """``[(name, input path, gt path)]`` for the split's images with a file ``<folder>/<name><suffix>``."""
    if not folder.is_dir():
        raise EvalInputError(f"{what} folder not found: {folder}")
    items, missing = [], []
    gt_of = getattr(ds, "mask_source", None)  # generated scenes: their masks are drawn, not read
    for name in ds.ids:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            items.append((name, str(path), gt_of(name) if gt_of is not None else str(ds.mask_path(name))))
        else:
            missing.append(name)
    if missing and (not allow_missing or not items):
        hint = "" if not items else f"; --allow-missing scores the other {len(items)}"
        raise EvalInputError(f"{len(missing)} of {len(ds.ids)} {what}s missing in {folder} (expected <id>{suffix}): "
                       f"{examples(missing, SHOW)}{hint}")
    return items, missing


def check_values(arr: np.ndarray, num_classes: int, path: str, what: str, allow_ignore: bool) -> None:
    values = np.flatnonzero(np.bincount(arr.reshape(-1), minlength=256))
    bad = [int(v) for v in values if v >= num_classes and not (allow_ignore and v == 255)]
    if bad:
        allowed = f"0-{num_classes - 1}" + (" and 255" if allow_ignore else "")
        raise EvalInputError(f"{what} {path} has label values {', '.join(map(str, bad))} outside {allowed}")


def read_gt(path: Any, num_classes: int) -> np.ndarray:
    """A ground-truth mask: a PNG file, or an object whose ``load()`` draws it (generated scenes)."""
    gt = path.load() if hasattr(path, "load") else read_label_png(path)
    check_values(gt, num_classes, path, "ground truth", allow_ignore=True)
    return gt


def eval_chunk(task: tuple[list[tuple[str, str, str]], int]) -> np.ndarray:
    items, num_classes = task
    metric = SegmentationMetric(num_classes)
    for _name, pred_path, gt_path in items:
        gt = read_gt(gt_path, num_classes)
        pred = read_label_png(pred_path)
        if pred.shape != gt.shape:
            raise EvalInputError(f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} but its ground truth "
                                 f"{gt_path} is {gt.shape[1]}x{gt.shape[0]}")
        check_values(pred, num_classes, pred_path, "prediction", allow_ignore=True)
        unscored = int(np.count_nonzero((pred == 255) & (gt != 255)))
        if unscored:
            raise EvalInputError(f"prediction {pred_path} has {unscored} pixels of value 255 (ignore) where the "
                                 "ground truth has a class: predict a class for every pixel")
        metric.update(pred, gt)
    return metric.confusion


def progress_bar(desc: str, images: int):
    """A ``parallel_map`` progress wrapper counting images (chunks of :data:`CHUNK`)."""
    from tqdm import tqdm

    def wrap(it, total, _desc):
        with tqdm(total=images, desc=desc, unit="img", disable=None) as bar:
            for task_result, n in zip(it, _sizes(images, total)):
                yield task_result
                bar.update(n)

    return wrap


def _sizes(images: int, tasks: int):
    for i in range(tasks):
        yield min(CHUNK, images - i * CHUNK)


def read_cams(path: str, num_classes: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(cams K×H×W float32, class_ids (K,) int64)`` of an archive, checked against the GT size."""
    try:
        with np.load(path) as z:
            cams, ids, stored_size = z["cams"], z["class_ids"], z["size"] if "size" in z.files else None
        if stored_size is not None and tuple(cams.shape[1:]) != tuple(hw):
            # reduced-resolution archive (excelseg pseudo-label --save-cams): upsample to the GT size
            cams, ids = read_cam_archive(path, size=tuple(hw))
    except KeyError as exc:
        raise EvalInputError(f"CAM archive {path} lacks {exc}: expected 'cams' and 'class_ids'") from None
    except Exception as exc:  # noqa: BLE001 (any unreadable archive is named)
        raise EvalInputError(f"cannot read CAM archive {path}: {type(exc).__name__}: {exc}") from None
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != ids.size:
        raise EvalInputError(f"CAM archive {path}: cams of shape {cams.shape} for {ids.size} class_ids")
    if tuple(cams.shape[1:]) != tuple(hw):
        raise EvalInputError(f"CAM archive {path} is {cams.shape[2]}x{cams.shape[1]} but its ground truth is "
                             f"{hw[1]}x{hw[0]}")
    if ids.size and (ids.min() < 1 or ids.max() > num_classes - 1):
        raise EvalInputError(f"CAM archive {path} has class_ids {ids.tolist()} outside 1-{num_classes - 1}")
    cams = cams.astype(np.float32)
    if not np.isfinite(cams).all():
        raise EvalInputError(f"CAM archive {path} holds NaN or infinite values")
    return cams, ids


def seed_labels(cams: np.ndarray, class_ids: np.ndarray, thresholds: list[float]) -> list[np.ndarray]:
    """Seed label maps (uint8) for each threshold: argmax over [t, cams…] → {0} ∪ class_ids."""
    hw = cams.shape[1:]
    if cams.shape[0] == 0:
        return [np.zeros(hw, dtype=np.uint8) for _ in thresholds]
    peak = cams.max(axis=0)
    top = class_ids.astype(np.uint8)[cams.argmax(axis=0)]
    return [np.where(peak > t, top, np.uint8(0)) for t in thresholds]


def cams_chunk(task: tuple[list[tuple[str, str, str]], int, list[float], dict[str, list[int]] | None]
                ) -> tuple[np.ndarray, list[str]]:
    """Worker: confusion matrices (T×C×C) and the ids whose archive lacks the CAM of a GT class.

    With ``labels`` ({id: GT label values}) only the CAMs of each image's GT classes are used."""
    items, num_classes, thresholds, labels = task
    metrics = [SegmentationMetric(num_classes) for _ in thresholds]
    differ = []
    for name, cam_path, gt_path in items:
        gt = read_gt(gt_path, num_classes)
        cams, ids = read_cams(cam_path, num_classes, gt.shape)
        if labels is not None:
            keep = np.isin(ids, labels[name])
            cams, ids = cams[keep], ids[keep]
            if set(labels[name]) - set(ids.tolist()):
                differ.append(name)
        for metric, pred in zip(metrics, seed_labels(cams, ids, thresholds)):
            metric.update(pred, gt)
    return np.stack([m.confusion for m in metrics]), differ


def score_folder(ds, folder: Path, suffix: str, what: str, worker, *, allow_missing: bool, workers: int,
                 extra=lambda chunk: (), desc: str = "eval") -> tuple[Any, list[tuple], list[str]]:
    """Run ``worker`` over the split's files ``<folder>/<id><suffix>`` in chunks of :data:`CHUNK` on ``workers``
    processes with a progress bar; each task is ``(chunk, num_classes, *extra(chunk))``.
    Returns ``(iterator of worker results, items, missing ids)``."""
    items, missing = find_inputs(ds, folder, suffix, what, allow_missing)
    c = ds.num_classes + 1
    tasks = [(part, c, *extra(part)) for part in (items[i:i + CHUNK] for i in range(0, len(items), CHUNK))]
    return parallel_map(worker, tasks, workers, 1, progress_bar(desc, len(items)), desc), items, missing
