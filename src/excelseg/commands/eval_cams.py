"""Score CAM seeds as the paper reports them (excelseg eval-cams): VOC train, image-level GT labels.

Reads the archives ``<cams>/<id>_cams.npz`` that ``excelseg cam --save-cams`` and ``pseudo-label --save-cams`` write (``cams`` K×H×W in [0, 1],
``class_ids`` (K,) their label values in the dataset's class order, e.g. ``--vocabulary voc``). As in the paper,
only the CAMs of the classes in each image's GT image-level labels are used (``--no-gt-labels`` uses every CAM of
the archive). Seed label per pixel = argmax over [threshold, cams…] mapped to {0} ∪ class_ids: the top class where
its CAM is above the background threshold (a tie goes to background), background elsewhere. A range of thresholds
is swept in one pass; the best mIoU is reported. The attention mode the archives were made with (``cam.attention``
of the folder's ``excelseg_config.yaml``) is reported; ``--attention MODE`` refuses a folder made with another."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .common import CliError, add_attention_arg, add_dataset_args, open_dataset_args
from .run_folder import RESOLVED_CONFIG_NAME, write_metrics_json

EXAMPLES = """examples:
  excelseg eval-cams --cams out/voc_train_cams --root ~/data/VOCdevkit
  excelseg eval-cams --cams out/cams --root ~/data/VOCdevkit --split val --bg-threshold 0.45
  excelseg eval-cams --cams out/cams --root ~/data/VOCdevkit --bg-threshold 0.2:0.6:0.02 --out seeds.json
  excelseg pseudo-label --root ~/data/VOCdevkit --attention naclip --save-cams --out-dir out/naclip
  excelseg eval-cams --cams out/naclip --root ~/data/VOCdevkit --attention naclip

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


def recorded_attention(cams_dir: Path) -> str | None:
    """``cam.attention`` of the settings ``cam`` / ``pseudo-label`` wrote beside the archives (``svc`` when they
    predate the setting); ``None`` without a readable ``excelseg_config.yaml``."""
    path = cams_dir / RESOLVED_CONFIG_NAME
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    cam = data.get("cam") if isinstance(data, dict) else None
    return str(cam.get("attention", "svc")) if isinstance(cam, dict) else None


def register(sub) -> None:
    p = sub.add_parser("eval-cams", help="mIoU of CAM seeds (<id>_cams.npz) over a background-threshold sweep",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cams", required=True, help="folder of <id>_cams.npz archives, as written by 'excelseg cam --save-cams' or "
                        "'excelseg pseudo-label --save-cams' (any stored size: upsampled to the ground truth)")
    p.add_argument("--bg-threshold", type=parse_thresholds, default=parse_thresholds("0.3:0.7:0.05"),
                   help="background threshold: a value, a comma list or START:STOP:STEP (default 0.3:0.7:0.05)")
    p.add_argument("--gt-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only the CAMs of each image's GT image-level classes (paper protocol; default on)")
    p.add_argument("--out", default=None, help="metrics JSON (default <CAMS>/cam_metrics.json)")
    add_attention_arg(p, "the attention mode the archives must have been made with (cam.attention of the folder's "
                         f"{RESOLVED_CONFIG_NAME}, written by 'excelseg cam' / 'pseudo-label --attention MODE')")
    add_dataset_args(p, "eval-cams", allow_missing=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..evaluation import cams_chunk, score_folder
    from ..metrics import SegmentationMetric, format_table

    cams_dir = Path(args.cams).expanduser()
    attention = recorded_attention(cams_dir)
    if args.attention is not None and attention is not None and attention != args.attention:
        raise CliError(f"the archives in {cams_dir} were made with --attention {attention}, not {args.attention} "
                       f"(cam.attention of {cams_dir / RESOLVED_CONFIG_NAME})")
    if args.attention is not None and attention is None:
        print(f"warning: {cams_dir} has no {RESOLVED_CONFIG_NAME}; cannot check that the archives were made with "
              f"--attention {args.attention}", file=sys.stderr)
    attention = attention or args.attention
    ds = open_dataset_args(args, "eval-cams", need_masks=True)
    thresholds = list(args.bg_threshold)

    def extra(chunk):  # the thresholds and, with --gt-labels, each image's GT label values
        return thresholds, ({name: ds.class_ids(name) for name, _, _ in chunk} if args.gt_labels else None)

    results_iter, items, missing = score_folder(ds, cams_dir, "_cams.npz", "CAM archive", cams_chunk,
                                                allow_missing=args.allow_missing, workers=args.workers, extra=extra,
                                                desc="eval-cams")
    c = ds.num_classes + 1
    names = ["background", *ds.class_names]
    confusion = np.zeros((len(thresholds), c, c), dtype=np.int64)
    differ: list[str] = []
    for part, d in results_iter:
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
          f"images of {ds.kind} {ds.split}" + (f"; {len(missing)} without CAMs skipped" if missing else "")
          + (f"; attention {attention}" if attention else ""))
    if differ:
        print(f"note: {len(differ)} archives lack the CAM of a GT class (e.g. {', '.join(differ[:5])}); "
              "those classes are never predicted there")
    out = {
        "dataset": ds.kind, "split": ds.split, "index": str(ds.index_path) if ds.index_path else None,
        "cams_dir": str(cams_dir), "thresholds": thresholds, "miou": mious,
        "mean_all_classes": [r["mean_all_classes"] for r in results],
        "best_threshold": thresholds[best], "best_miou": mious[best], "best": results[best],
        "evaluated": len(items), "missing": len(missing), "missing_ids": missing[:100],
        "gt_labels": bool(args.gt_labels), "archives_missing_gt_classes": len(differ), "attention": attention,
    }
    write_metrics_json(Path(args.out) if args.out else cams_dir / "cam_metrics.json", out, explicit=args.out is not None)
    return 0
