"""Score predicted masks against a dataset's ground truth: per-class IoU, mIoU, accuracy (excelseg eval).

Predictions are index PNGs ``<pred>/<id>.png`` (0 = background, i = i-th class of the dataset, any palette), of
the same size as the ground truth. The metric is EXCEL_SPEC §6: confusion matrix over GT pixels that are not 255;
mIoU over the classes present in the GT (the reference's logged tables print the mean over all classes, shown
too when it differs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_dataset_args, open_dataset_args, write_metrics_json

EXAMPLES = """examples:
  excelseg eval --pred out/val_preds --dataset voc --root ~/data/VOCdevkit --split val
  excelseg eval --pred out/coco_preds --dataset coco --root ~/data/coco --split val_part --out coco.json
  excelseg eval --pred out/mine --dataset folder --index photos/excelseg_index.json --allow-missing

The dataset must have been prepared ('excelseg prepare ...'). Results: a table on stdout and a JSON file
(default <PRED>/metrics.json) with per-class IoU / precision / recall, mIoU, pixel accuracy and the confusion
matrix. Exit status: 0 done, 2 bad input (missing predictions, size mismatch, unknown label values, ...)."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="mIoU of predicted masks against a prepared dataset's ground truth",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="folder of predicted <id>.png index masks")
    p.add_argument("--out", default=None, help="metrics JSON (default <PRED>/metrics.json)")
    add_dataset_args(p, "eval", allow_missing=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import eval_chunk, score_folder
    from ..metrics import SegmentationMetric, format_table

    ds = open_dataset_args(args, "eval", need_masks=True)
    pred_dir = Path(args.pred).expanduser()
    results, items, missing = score_folder(ds, pred_dir, ".png", "prediction", eval_chunk,
                                           allow_missing=args.allow_missing, workers=args.workers)
    metric = SegmentationMetric(ds.num_classes + 1, class_names=["background", *ds.class_names])
    for confusion in results:
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
    write_metrics_json(out, result, explicit=args.out is not None)
    return 0
