"""Score predicted masks against a dataset's ground truth: per-class IoU, mIoU, accuracy (excelseg eval).

Predictions are index PNGs ``<pred>/<id>.png`` (0 = background, i = i-th class of the dataset, any palette), of
the same size as the ground truth. The metric is EXCEL_SPEC §6: confusion matrix over GT pixels that are not 255;
mIoU over the classes present in the GT (the reference's logged tables print the mean over all classes, shown
too when it differs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..cli import CliError

EXAMPLES = """examples:
  excelseg eval --pred out/val_preds --dataset voc --root ~/data/VOCdevkit --split val
  excelseg eval --pred out/coco_preds --dataset coco --root ~/data/coco --split val_part --out coco.json
  excelseg eval --pred out/mine --dataset folder --index photos/excelseg_index.json --allow-missing

The dataset must have been prepared ('excelseg prepare ...'). Results: a table on stdout and a JSON file
(default <PRED>/metrics.json) with per-class IoU / precision / recall, mIoU, pixel accuracy and the confusion
matrix. Exit status: 0 done, 2 bad input (missing predictions, size mismatch, unknown label values, ...)."""

SHOW = 5  # ids named in an error message
CHUNK = 32  # images per worker task


class EvalInputError(ValueError):
    """A prediction or ground-truth file that cannot be scored; the message names it."""


def add_dataset_args(p: argparse.ArgumentParser, default_dataset: str, default_split: str | None,
                     split_help: str = "val for voc/coco, all for folder") -> None:
    from ..data import DATASET_KINDS
    from ..data.index import default_workers

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASET_KINDS, default=default_dataset,
                   help=f"dataset kind (default {default_dataset})")
    g.add_argument("--root", default=None, help="dataset root as given to 'excelseg prepare' "
                                                "(finds <ROOT>/excelseg_index.json)")
    g.add_argument("--index", default=None, help="index JSON written by 'excelseg prepare' (instead of --root)")
    split_default = default_split or split_help
    g.add_argument("--split", default=default_split, help=f"split to score (default {split_default})")
    g.add_argument("--allow-missing", action="store_true",
                   help="skip images without a prediction (reported) instead of failing")
    nw = default_workers()
    g.add_argument("--workers", type=int, default=nw, help=f"processes reading files (default {nw})")


def register(sub) -> None:
    p = sub.add_parser("eval", help="mIoU of predicted masks against a prepared dataset's ground truth",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="folder of predicted <id>.png index masks")
    p.add_argument("--out", default=None, help="metrics JSON (default <PRED>/metrics.json)")
    add_dataset_args(p, "voc", None)
    p.set_defaults(func=run)


def open_gt_dataset(args: argparse.Namespace):
    """The dataset of ``--dataset/--root/--index/--split``, checked to have GT masks."""
    from ..data import open_dataset

    if args.root is None and args.index is None:
        raise CliError("give --root (the prepared dataset) or --index")
    ds = open_dataset(args.dataset, root=args.root, split=args.split, index=args.index)
    if not ds.has_masks:
        raise CliError(f"split {ds.split!r} of {ds.kind} has no ground-truth masks to score against")
    if not ds.ids:
        raise CliError(f"split {ds.split!r} of {ds.kind} is empty")
    return ds


def find_inputs(ds, folder: Path, suffix: str, what: str, allow_missing: bool) -> tuple[list[tuple], list[str]]:
    """``[(name, input path, gt path)]`` for the split's images with a file ``<folder>/<name><suffix>``."""
    from ..data.index import examples

    if not folder.is_dir():
        raise CliError(f"{what} folder not found: {folder}")
    items, missing = [], []
    for name in ds.ids:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            items.append((name, str(path), str(ds.mask_path(name))))
        else:
            missing.append(name)
    if missing and (not allow_missing or not items):
        hint = "" if not items else f"; --allow-missing scores the other {len(items)}"
        raise CliError(f"{len(missing)} of {len(ds.ids)} {what}s missing in {folder} (expected <id>{suffix}): "
                       f"{examples(missing, SHOW)}{hint}")
    return items, missing


def check_values(arr: np.ndarray, num_classes: int, path: str, what: str, allow_ignore: bool) -> None:
    values = np.flatnonzero(np.bincount(arr.reshape(-1), minlength=256))
    bad = [int(v) for v in values if v >= num_classes and not (allow_ignore and v == 255)]
    if bad:
        allowed = f"0-{num_classes - 1}" + (" and 255" if allow_ignore else "")
        raise EvalInputError(f"{what} {path} has label values {', '.join(map(str, bad))} outside {allowed}")


def read_gt(path: str, num_classes: int) -> np.ndarray:
    from ..io import read_label_png

    gt = read_label_png(path)
    check_values(gt, num_classes, path, "ground truth", allow_ignore=True)
    return gt


def _eval_chunk(task: tuple[list[tuple[str, str, str]], int]) -> np.ndarray:
    from ..io import read_label_png
    from ..metrics import SegmentationMetric

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


def chunks(items: list, num_classes: int, *extra: Any) -> list[tuple]:
    return [(items[i:i + CHUNK], num_classes, *extra) for i in range(0, len(items), CHUNK)]


def progress_bar(desc: str, images: int):
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


def write_json(path: Path, obj: dict[str, Any], explicit: bool) -> None:
    from ..io import save_json

    try:
        save_json(path, obj)
        print(f"metrics written to {path}")
    except OSError as exc:
        if explicit:
            raise CliError(f"cannot write {path} ({exc.strerror or exc})") from None
        print(f"warning: cannot write {path} ({exc.strerror or exc}); use --out", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..data.index import parallel_map
    from ..metrics import SegmentationMetric, format_table

    ds = open_gt_dataset(args)
    pred_dir = Path(args.pred).expanduser()
    items, missing = find_inputs(ds, pred_dir, ".png", "prediction", args.allow_missing)
    c = ds.num_classes + 1
    metric = SegmentationMetric(c, class_names=["background", *ds.class_names])
    tasks = chunks(items, c)
    for confusion in parallel_map(_eval_chunk, tasks, args.workers, 1, progress_bar("eval", len(items)), "eval"):
        metric.update_confusion(confusion)
    result = metric.compute()
    print(format_table(result))
    print(f"evaluated {len(items)} of {len(ds.ids)} images of {ds.kind} {ds.split}"
          + (f"; {len(missing)} without a prediction skipped" if missing else ""))
    result.update({
        "dataset": ds.kind, "split": ds.split, "index": str(ds.index_path) if ds.index_path else None,
        "pred_dir": str(pred_dir), "evaluated": len(items), "missing": len(missing),
        "missing_ids": missing[:100],
    })
    out = Path(args.out) if args.out else pred_dir / "metrics.json"
    write_json(out, result, explicit=args.out is not None)
    return 0
