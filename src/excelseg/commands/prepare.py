"""Check a dataset and write its index JSON: splits, image-level labels, sizes (excelseg prepare).

VOC: checks JPEGImages, SegmentationClass, SegmentationClassAug (SBD) and ImageSets/Segmentation, and takes the
image-level labels from Annotations/*.xml (the field's convention; the masks where there is no XML) or from a
ready-made labels file. COCO: converts instance annotations to VOC-style index masks (needs pycocotools); labels
are the categories annotated on each image. folder: your own images with a labels file of tags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import CliError

EXAMPLES = """examples:
  excelseg prepare voc ~/data/VOCdevkit
  excelseg prepare voc ~/data/VOCdevkit --labels ExCEL/datasets/voc/cls_labels_onehot.npy
  excelseg prepare coco ~/data/coco --annotations annotations/instances_train2014.json \\
      --annotations annotations/instances_val2014.json --workers 16
  excelseg prepare folder photos/ --labels labels.csv --masks photo_masks/ --classes "cat,dog"

The index goes to <ROOT>/excelseg_index.json (--out to choose); 'excelseg eval' and the datasets read it.
Exit status: 0 all good, 1 problems found (listed; the index was written without the bad images),
2 the dataset is unusable or the arguments are wrong."""


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers must be an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--workers must be >= 0, got {n}")
    return n


def register(sub) -> None:
    from ..data.index import default_workers

    p = sub.add_parser("prepare", help="check a dataset (voc, coco, folder) and write its index",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    nw = default_workers()

    v = kinds.add_parser("voc", help="PASCAL VOC 2012 (+ SBD SegmentationClassAug)",
                         description="Check a VOC 2012 tree and write its index: splits train, val, trainval, "
                                     "test (ImageSets/Segmentation), train_aug (SegmentationClassAug minus val), "
                                     "image-level labels, image sizes. Labels: every <object> <name> of "
                                     "Annotations/<id>.xml that is a VOC class (difficult and truncated objects "
                                     "included, part names ignored: the field's cls_labels convention); the mask's "
                                     "classes where there is no XML (reported). Disagreements between annotations "
                                     "and masks are reported in both directions.")
    v.add_argument("root", help="VOCdevkit/VOC2012 (or VOCdevkit, or the folder holding VOCdevkit)")
    v.add_argument("--labels", default=None, metavar="FILE",
                   help="ready-made image-level labels, used for the images they list: cls_labels_onehot.npy "
                        "(the reference's), cls_labels.npy (pickled dict id -> 20-vector, read without running "
                        "code) or a CSV/JSON as for 'prepare folder' (image,classes)")
    v.add_argument("--labels-from", choices=("annotations", "mask"), default="annotations",
                   help="annotations (default: Annotations/*.xml, the mask where there is no XML) or mask "
                        "(foreground values of each mask; not the field's convention)")
    v.add_argument("--out", default=None, help="index file (default <VOC2012>/excelseg_index.json)")
    v.add_argument("--workers", type=_workers, default=nw, help=f"processes reading masks (default {nw})")
    v.set_defaults(func=run_voc)

    c = kinds.add_parser("coco", help="MS-COCO: instance annotations -> index masks (needs pycocotools)",
                         description="Convert COCO instance annotations to VOC-style index masks "
                                     "(0 background, 1-80 categories by id, 255 crowd) and write the index. "
                                     "Overlap rule: crowd regions 255 first, then instances by decreasing area, "
                                     "so the smaller instance wins. Resumable; writes are atomic.")
    c.add_argument("root", help="COCO root: images in JPEGImages/{train,val}/ or {train,val}2014/")
    c.add_argument("--annotations", action="append", required=True, metavar="JSON",
                   help="instances_train2014.json / instances_val2014.json (repeat for both)")
    c.add_argument("--out-masks", default=None, help="mask folder (default <ROOT>/SegmentationClass)")
    c.add_argument("--out", default=None, help="index file (default <ROOT>/excelseg_index.json; "
                                               "splits of an existing index not given here are kept)")
    c.add_argument("--workers", type=_workers, default=nw, help=f"processes making masks (default {nw})")
    c.add_argument("--val-part", type=int, default=5000, help="size of val_part (first ids of val; default 5000)")
    c.add_argument("--overwrite", action="store_true", help="redo masks that already exist")
    c.add_argument("--labels-from", choices=("annotations", "mask"), default="annotations",
                   help="image-level labels: annotations (default: the categories of every annotation of the "
                        "image, crowd included, as the field's COCO label files) or mask (classes visible in "
                        "the written mask; hidden and crowd-only categories drop out). The count of images on "
                        "which they differ is reported either way")
    c.add_argument("--labels", default=None, metavar="FILE",
                   help="ready-made image-level labels, used for the images they list: a cls_labels_onehot.npy "
                        "(dict COCO_train2014_<id> -> 80-vector, read without running code) or a CSV/JSON as "
                        "for 'prepare folder'")
    c.set_defaults(func=run_coco)

    f = kinds.add_parser("folder", help="your own images with a labels file of tags",
                         description="Index your own images: a labels CSV (image,classes with classes "
                                     "separated by ';' or '|') or JSON ({\"img.jpg\": [\"cat\"]}), optional "
                                     "<id>.png index masks for evaluation.")
    f.add_argument("images", help="folder the labels file's image paths are relative to")
    f.add_argument("--labels", required=True, help="labels file (.csv or .json)")
    f.add_argument("--masks", default=None, help="folder of <id>.png index masks (optional)")
    f.add_argument("--classes", default=None,
                   help="class list: voc, coco, a comma list or a .txt/.json file (default: sorted unique tags)")
    f.add_argument("--out", default=None, help="index file (default <IMAGES>/excelseg_index.json)")
    f.add_argument("--workers", type=_workers, default=nw, help=f"processes reading images (default {nw})")
    f.set_defaults(func=run_folder)


def _progress():
    from tqdm import tqdm

    return lambda it, total, desc: tqdm(it, total=total, desc=desc, unit="img", disable=None)


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

    result = build_voc_index(args.root, workers=args.workers, progress=_progress(), labels_file=args.labels,
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
    if args.val_part < 0:
        raise CliError(f"--val-part must be >= 0, got {args.val_part}")
    out = Path(args.out) if args.out else Path(args.root).expanduser() / DEFAULT_INDEX_NAME
    result = build_coco_index(args.root, args.annotations, out_masks=args.out_masks, workers=args.workers,
                              val_part=args.val_part, overwrite=args.overwrite, merge_with=out,
                              progress=_progress(), labels_from=args.labels_from,
                              labels_file=args.labels)
    return _finish(result, out, "COCO")


def run_folder(args: argparse.Namespace) -> int:
    from ..data.folder import build_folder_index
    from ..data.index import DEFAULT_INDEX_NAME

    result = build_folder_index(args.images, args.labels, masks_dir=args.masks, classes=args.classes,
                                workers=args.workers, progress=_progress())
    out = Path(args.out) if args.out else Path(args.images).expanduser() / DEFAULT_INDEX_NAME
    return _finish(result, out, "folder")
