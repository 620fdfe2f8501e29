"""Score CAM seeds as the paper reports them (excelseg eval-cams): VOC train, image-level GT labels.

Reads the archives ``<cams>/<id>_cams.npz`` that ``excelseg cam --save-cams`` writes (``cams`` K×H×W in [0, 1],
``class_ids`` (K,) their label values in the dataset's class order, e.g. ``--vocabulary voc``). As in the paper,
only the CAMs of the classes in each image's GT image-level labels are used (``--no-gt-labels`` uses every CAM of
the archive). Seed label per pixel = argmax over [threshold, cams…] mapped to {0} ∪ class_ids: the top class where
its CAM is above the background threshold (a tie goes to background), background elsewhere. A range of thresholds
is swept in one pass; the best mIoU is reported."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from .eval import (
    EvalInputError,
    add_dataset_args,
    chunks,
    find_inputs,
    open_gt_dataset,
    progress_bar,
    read_gt,
    write_json,
)

EXAMPLES = """examples:
  excelseg eval-cams --cams out/voc_train_cams --root ~/data/VOCdevkit
  excelseg eval-cams --cams out/cams --root ~/data/VOCdevkit --split val --bg-threshold 0.45
  excelseg eval-cams --cams out/cams --root ~/data/VOCdevkit --bg-threshold 0.2:0.6:0.02 --out seeds.json

Results: one mIoU per threshold, the best threshold's per-class table, and a JSON file (default
<CAMS>/cam_metrics.json)."""


def parse_thresholds(text: str) -> list[float]:
    """``"0.45"``, ``"0.3,0.4,0.5"`` or ``"START:STOP:STEP"`` (STOP included) → thresholds in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise argparse.ArgumentTypeError(f"range must be START:STOP:STEP with STOP >= START, STEP > 0; "
                                                 f"got {text!r}")
            n = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be a number, a comma list or START:STOP:STEP, "
                                         f"got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must lie in [0, 1], got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("eval-cams", help="mIoU of CAM seeds (<id>_cams.npz) over a background-threshold sweep",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cams", required=True, help="folder of <id>_cams.npz written by 'excelseg cam --save-cams'")
    p.add_argument("--bg-threshold", type=parse_thresholds, default=parse_thresholds("0.3:0.7:0.05"),
                   help="background threshold: a value, a comma list or START:STOP:STEP (default 0.3:0.7:0.05)")
    p.add_argument("--gt-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only the CAMs of each image's GT image-level classes (paper protocol; default on)")
    p.add_argument("--out", default=None, help="metrics JSON (default <CAMS>/cam_metrics.json)")
    add_dataset_args(p, "voc", None, "train for voc/coco, all for folder")
    p.set_defaults(func=run)


def read_cams(path: str, num_classes: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(cams K×H×W float32, class_ids (K,) int64)`` of an archive, checked against the GT size."""
    try:
        with np.load(path) as z:
            cams, ids, stored_size = z["cams"], z["class_ids"], z["size"] if "size" in z.files else None
        if stored_size is not None and tuple(cams.shape[1:]) != tuple(hw):
            # reduced-resolution archive (excelseg pseudo-label --save-cams): upsample to the GT size
            from ..batch import read_cam_archive

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


def _cams_chunk(task: tuple[list[tuple[str, str, str]], int, list[float], dict[str, list[int]] | None]
                ) -> tuple[np.ndarray, list[str]]:
    """Worker: confusion matrices (T×C×C) and the ids whose archive lacks the CAM of a GT class.

    With ``labels`` ({id: GT label values}) only the CAMs of each image's GT classes are used."""
    from ..metrics import SegmentationMetric

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


def run(args: argparse.Namespace) -> int:
    from ..data.index import parallel_map
    from ..metrics import SegmentationMetric, format_table

    if args.split is None:
        args.split = "all" if args.dataset == "folder" else "train"
    ds = open_gt_dataset(args)
    cams_dir = Path(args.cams).expanduser()
    items, missing = find_inputs(ds, cams_dir, "_cams.npz", "CAM archive", args.allow_missing)
    c = ds.num_classes + 1
    thresholds = list(args.bg_threshold)
    names = ["background", *ds.class_names]
    confusion = np.zeros((len(thresholds), c, c), dtype=np.int64)
    tasks = [(*t, {name: ds.class_ids(name) for name, _, _ in t[0]} if args.gt_labels else None)
             for t in chunks(items, c, thresholds)]
    differ: list[str] = []
    for part, d in parallel_map(_cams_chunk, tasks, args.workers, 1, progress_bar("eval-cams", len(items)), ""):
        confusion += part
        differ += d
    results = [SegmentationMetric.from_confusion(m, class_names=names).compute() for m in confusion]
    mious = [r["miou"] for r in results]
    finite = [m if not math.isnan(m) else -1.0 for m in mious]
    best = finite.index(max(finite))  # the lowest threshold among equals
    print(f"{'bg threshold':<14}{'mIoU':>8}")
    for i, (t, m) in enumerate(zip(thresholds, mious)):
        print(f"{t:<14.4g}{100 * m:>8.2f}" + ("  <- best" if i == best else ""))
    print()
    print(format_table(results[best]))
    print(f"best: mIoU {100 * mious[best]:.2f} at background threshold {thresholds[best]:g} over {len(items)} "
          f"images of {ds.kind} {ds.split}" + (f"; {len(missing)} without CAMs skipped" if missing else ""))
    if differ:
        print(f"note: {len(differ)} archives lack the CAM of a GT class (e.g. {', '.join(differ[:5])}); "
              "those classes are never predicted there")
    out = {
        "dataset": ds.kind, "split": ds.split, "index": str(ds.index_path) if ds.index_path else None,
        "cams_dir": str(cams_dir), "thresholds": thresholds, "miou": mious,
        "mean_all_classes": [r["mean_all_classes"] for r in results],
        "best_threshold": thresholds[best], "best_miou": mious[best], "best": results[best],
        "evaluated": len(items), "missing": len(missing), "missing_ids": missing[:100],
        "gt_labels": bool(args.gt_labels), "archives_missing_gt_classes": len(differ),
    }
    write_json(Path(args.out) if args.out else cams_dir / "cam_metrics.json", out, explicit=args.out is not None)
    return 0
