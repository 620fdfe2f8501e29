"""Check a dataset and write its index JSON: splits, image-level labels, sizes (excelseg prepare).

VOC: checks JPEGImages, SegmentationClass, SegmentationClassAug (SBD) and ImageSets/Segmentation, and takes the
image-level labels from Annotations/*.xml (the field's convention; the masks where there is no XML) or from a
ready-made labels file. COCO: converts instance annotations to VOC-style index masks (needs pycocotools); labels
are the categories annotated on each image. folder: your own images with a labels file of tags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import DATASET_KINDS, CliError, default_workers, progress, ranged, workers_arg

EXAMPLES = """examples:
  excelseg prepare --dataset voc --root ~/data/VOCdevkit
  excelseg prepare --dataset voc --root ~/data/VOCdevkit --labels ExCEL/datasets/voc/cls_labels_onehot.npy
  excelseg prepare --dataset coco --root ~/data/coco --annotations annotations/instances_train2014.json \\
      --annotations annotations/instances_val2014.json --workers 16
  excelseg prepare --dataset folder --root photos/ --labels labels.csv --masks photo_masks/ --classes "cat,dog"

The old spelling 'excelseg prepare voc ROOT' still works in this release (with a deprecation warning).
The index goes to <ROOT>/excelseg_index.json (--out to choose); 'excelseg eval' and the datasets read it.
Exit status: 0 all good, 1 problems found (listed; the index was written without the bad images),
2 the dataset is unusable or the arguments are wrong."""


def register(sub) -> None:
    p = sub.add_parser("prepare", help="check a dataset (voc, coco, folder) and write its index",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASET_KINDS, required=True, help="dataset kind")
    g.add_argument("--root", required=True,
                   help="voc: VOCdevkit/VOC2012 (or VOCdevkit, or the folder holding VOCdevkit); coco: images in "
                        "JPEGImages/{train,val}/ or {train,val}2014/; folder: the folder the labels file's image "
                        "paths are relative to")
    g.add_argument("--out", default=None, help="index file (default <ROOT>/excelseg_index.json; for voc the "
                                               "VOC2012 folder; for coco splits of an existing index not given "
                                               "here are kept)")
    nw = default_workers()
    g.add_argument("--workers", type=workers_arg, default=nw, help=f"processes reading files (default {nw})")
    lab = p.add_argument_group("image-level labels")
    lab.add_argument("--labels", default=None, metavar="FILE",
                     help="voc/coco: ready-made labels used for the images they list — cls_labels_onehot.npy "
                          "(the reference's), cls_labels.npy (pickled dict id -> vector, read without running "
                          "code) or a CSV/JSON as for folder; folder: the labels file (.csv image,classes with "
                          "';'-separated classes, or .json {\"img.jpg\": [\"cat\"]}), required")
    lab.add_argument("--labels-from", choices=("annotations", "mask"), default="annotations",
                     help="voc: Annotations/*.xml (default; the mask where there is no XML) or mask; coco: the "
                          "categories of every annotation of the image, crowd included (default) or the classes "
                          "visible in the written mask. Disagreements are reported either way")
    c = p.add_argument_group("coco only")
    c.add_argument("--annotations", action="append", default=None, metavar="JSON",
                   help="instances_train2014.json / instances_val2014.json (repeat for both; required for coco)")
    c.add_argument("--out-masks", default=None, help="mask folder (default <ROOT>/SegmentationClass)")
    c.add_argument("--val-part", type=ranged(int, 0), default=5000,
                   help="size of val_part (first ids of val; default 5000)")
    c.add_argument("--overwrite", action="store_true", help="redo masks that already exist")
    f = p.add_argument_group("folder only")
    f.add_argument("--masks", default=None, help="folder of <id>.png index masks (optional)")
    f.add_argument("--classes", default=None,
                   help="class list: voc, coco, a comma list or a .txt/.json file (default: sorted unique tags)")
    p.set_defaults(func=run)


_ONLY = {"coco": ("annotations", "out_masks", "overwrite"), "folder": ("masks", "classes")}


def run(args: argparse.Namespace) -> int:
    for kind, names in _ONLY.items():
        given = [n for n in names if getattr(args, n) not in (None, False)]
        if given and args.dataset != kind:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise CliError(f"{flags} only apply to --dataset {kind}")
    return {"voc": run_voc, "coco": run_coco, "folder": run_folder}[args.dataset](args)


def _finish(result, out: Path, kind: str) -> int:
    from ..data.index import save_index

    for note in result.notes:
        print(f"note: {note}")
    try:
        save_index(out, result.index)
    except OSError as exc:
        raise CliError(f"cannot write the index to {out} ({exc.strerror or exc}); choose another with --out") \
            from None
    counts = ", ".join(f"{k} {v}" for k, v in result.index["counts"].items())
    print(f"{kind} index written to {out}: {len(result.index['class_names'])} classes; splits: {counts}")
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    if result.problems:
        print(f"{len(result.problems)} problems found (listed above); unusable images are left out of the splits",
              file=sys.stderr)
        return 1
    return 0


def run_voc(args: argparse.Namespace) -> int:
    from ..data.index import DEFAULT_INDEX_NAME
    from ..data.voc import build_voc_index

    result = build_voc_index(args.root, workers=args.workers, progress=progress(), labels_file=args.labels,
                             labels_from=args.labels_from)
    out = Path(args.out) if args.out else Path(result.index["root"]) / DEFAULT_INDEX_NAME
    return _finish(result, out, "VOC")


def run_coco(args: argparse.Namespace) -> int:
    from ..data.coco import build_coco_index, require_pycocotools
    from ..data.index import DEFAULT_INDEX_NAME

    try:
        require_pycocotools()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    if not args.annotations:
        raise CliError("--dataset coco needs --annotations instances_train2014.json [--annotations ...]")
    if args.val_part < 0:
        raise CliError(f"--val-part must be >= 0, got {args.val_part}")
    out = Path(args.out) if args.out else Path(args.root).expanduser() / DEFAULT_INDEX_NAME
    result = build_coco_index(args.root, args.annotations, out_masks=args.out_masks, workers=args.workers,
                              val_part=args.val_part, overwrite=args.overwrite, merge_with=out,
                              progress=progress(), labels_from=args.labels_from,
                              labels_file=args.labels)
    return _finish(result, out, "COCO")


def run_folder(args: argparse.Namespace) -> int:
    from ..data.folder import build_folder_index
    from ..data.index import DEFAULT_INDEX_NAME

    if args.labels is None:
        raise CliError("--dataset folder needs --labels FILE (image,classes CSV or JSON)")
    if args.labels_from != "annotations":
        raise CliError("--labels-from applies to voc and coco")
    result = build_folder_index(args.root, args.labels, masks_dir=args.masks, classes=args.classes,
                                workers=args.workers, progress=progress())
    out = Path(args.out) if args.out else Path(args.root).expanduser() / DEFAULT_INDEX_NAME
    return _finish(result, out, "folder")
