"""Score predicted masks against a dataset's ground truth: per-class IoU, mIoU, accuracy (excelseg eval).

Predictions are index PNGs ``<pred>/<id>.png`` (0 = background, i = i-th class of the dataset, any palette), of
the same size as the ground truth. The metric is EXCEL_SPEC §6: confusion matrix over GT pixels that are not 255;
mIoU over the classes present in the GT (the reference's logged tables print the mean over all classes, shown
too when it differs).

Variants of 'excelseg segment' found in a folder are scored as extra rows: <id>_ss.png (single-scale),
<id>.png (multi-scale + flip), <id>_crf.png (+ CRF). Several --pred folders (runs of the same setting, e.g.
seeds) are summarised as mean ± std of the mIoU per variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_dataset_args, open_dataset_args
from .run_folder import write_metrics_json

EXAMPLES = """examples:
  excelseg eval --pred out/val_preds --dataset voc --root ~/data/VOCdevkit --split val
  excelseg eval --pred out/coco_preds --dataset coco --root ~/data/coco --split val_part --out coco.json
  excelseg eval --pred out/mine --dataset folder --index photos/excelseg_index.json --allow-missing
  excelseg eval --pred seg_seed0 seg_seed1 seg_seed2 --dataset voc --root ~/data/VOCdevkit --out runs.json

The dataset must have been prepared ('excelseg prepare ...'). Results: a table on stdout and a JSON file
(default <PRED>/metrics.json) with per-class IoU / precision / recall, mIoU, pixel accuracy and the confusion
matrix. Exit status: 0 done, 2 bad input (missing predictions, size mismatch, unknown label values, ...)."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="mIoU of predicted masks against a prepared dataset's ground truth",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, nargs="+", metavar="PRED",
                   help="folder(s) of predicted <id>.png index masks (several: runs summarised as mean ± std)")
    p.add_argument("--out", default=None, help="metrics JSON (default <PRED>/metrics.json of the first folder)")
    add_dataset_args(p, "eval", allow_missing=True)
    p.set_defaults(func=run)


VARIANTS = (("_ss.png", "single-scale"), (".png", None), ("_crf.png", "+CRF"))  # segment's outputs


def _main_name(folder: Path) -> str:
    cfg = folder / "excelseg_config.yaml"
    try:
        return "MS+flip" if "# command: segment" in cfg.read_text(encoding="utf-8") else "prediction"
    except OSError:
        return "prediction"


def variants_of(folder: Path) -> list[tuple[str, str]]:
    """``(suffix, row name)`` of the prediction variants present in ``folder`` (the plain ``.png`` always)."""
    found = []
    for suffix, name in VARIANTS:
        if suffix == ".png" or next(folder.glob(f"*{suffix}"), None) is not None:
            found.append((suffix, name or _main_name(folder)))
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvalInputError, eval_chunk, score_folder
    from ..metrics import SegmentationMetric, format_table

    ds = open_dataset_args(args, "eval", need_masks=True)
    c = ds.num_classes + 1
    folders = [Path(p).expanduser() for p in args.pred]
    runs = []
    for pred_dir in folders:
        if not pred_dir.is_dir():
            raise EvalInputError(f"prediction folder not found: {pred_dir}")
        for suffix, row in variants_of(pred_dir):
            results, items, missing = score_folder(ds, pred_dir, suffix, "prediction", eval_chunk,
                                                   allow_missing=args.allow_missing, workers=args.workers,
                                                   desc=f"eval {row}")
            metric = SegmentationMetric(c, class_names=["background", *ds.class_names])
            for confusion in results:
                metric.update_confusion(confusion)
            result = metric.compute()
            result.update({"pred_dir": str(pred_dir), "variant": row, "suffix": suffix, "evaluated": len(items),
                           "missing": len(missing), "missing_ids": missing[:100]})
            runs.append(result)
    first = runs[0] if len(runs) == 1 else next(r for r in runs if r["suffix"] == ".png")
    print(format_table(first))
    if len(runs) > 1:
        width = max(len(str(r["pred_dir"])) for r in runs)
        print(f"\n{'predictions':<{width}}  {'variant':<13}{'mIoU':>8}{'pAcc':>8}")
        for r in runs:
            print(f"{r['pred_dir']:<{width}}  {r['variant']:<13}{100 * r['miou']:>8.2f}"
                  f"{100 * r['pixel_accuracy']:>8.2f}")
    summary = {}
    if len(folders) > 1:
        print(f"\nmean ± std over {len(folders)} runs (sample std):")
        for row in dict.fromkeys(r["variant"] for r in runs):
            vals = [r["miou"] for r in runs if r["variant"] == row]
            mean, std = _mean_std(vals)
            summary[row] = {"miou_mean": mean, "miou_std": std, "runs": len(vals)}
            print(f"  {row:<13} mIoU {100 * mean:.2f} ± {100 * std:.2f}  ({len(vals)} runs)")
    n_missing = first["missing"]
    print(f"evaluated {first['evaluated']} of {len(ds.ids)} images of {ds.kind} {ds.split}"
          + (f"; {n_missing} without a prediction skipped" if n_missing else ""))
    meta = {"dataset": ds.kind, "split": ds.split, "index": str(ds.index_path) if ds.index_path else None}
    if len(runs) == 1:
        out_obj = {**first, **meta}
    else:
        out_obj = {**meta, "runs": runs, "summary": summary}
    out = Path(args.out) if args.out else folders[0] / "metrics.json"
    write_metrics_json(out, out_obj, explicit=args.out is not None)
    return 0
