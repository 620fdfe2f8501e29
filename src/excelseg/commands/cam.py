"""Training-free CAMs and pseudo-labels for any images and class names (excelseg cam)."""

from __future__ import annotations

import argparse

from .common import (
    CliError,
    add_job_args,
    add_model_args,
    add_out_dir,
    add_vocabulary_arg,
    cam_predictor,
    clip_spec_arg,
    config_from_args,
    load_checkpoint_arg,
    out_dir_arg,
    split_overrides,
    warn_unknown_classes,
)
from .run_folder import check_run_folder, check_writable, commit_run_folder, unique_stems

EXAMPLES = """examples:
  excelseg cam photos/ --classes "cat,dog,sofa" --out-dir out/
  excelseg cam 'shots/*.jpg' --classes classes.txt --clip ~/weights/ViT-B-16.pt --save-cams
  excelseg cam img.jpg --vocabulary voc --classes "cat,sofa" --bank voc_bank.pth --out-dir out/
  excelseg cam shots/ --classes "forklift,pallet" --knowledge kb.json --out-dir out/
  excelseg cam photos/ --classes "cat,dog" --config coco cam.flip=true refine.box_threshold=0.85
  excelseg cam img.jpg --classes "cat,sofa" --checkpoint voc_heads.safetensors --bank voc_bank.pth --out-dir out/

Outputs per image: <stem>.png (palette pseudo-label: 0 = background, i = i-th class of the vocabulary),
<stem>_overlay.jpg (label overlay with legend + heat-maps, at most 24: present classes first), and with
--save-cams <stem>_cams.npz. <stem>: the file stem; inputs sharing one keep their relative path (and extension).
The folder's excelseg_run.json records what made the outputs: a re-run of the same run skips finished images, one
with other settings is refused (--overwrite redoes everything); files are written atomically.
Exit status: 0 all done, 1 some images failed (listed at the end), 2 usage/setup error."""


def register(sub) -> None:
    p = sub.add_parser("cam", help="training-free CAMs + pseudo-labels for images and class names",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories or glob patterns; section.key=value words override settings")
    p.add_argument("--classes", default=None,
                   help="classes present in the images: comma list or a .txt/.json file "
                        "(required unless --vocabulary is given, in which case all its classes compete)")
    add_vocabulary_arg(p, "texts the alignment is computed against: voc, coco, a comma list or a file "
                          "(default: the --classes themselves plus the paper's background words)")
    add_out_dir(p, "excelseg_out", "folder for the per-image outputs")
    p.add_argument("--save-cams", action="store_true", help="also write the CAM archive <stem>_cams.npz")
    p.add_argument("--cam-size", default="full",
                   help="size of the archived CAMs: full (the image, default), grid (the patch grid) or N = longer "
                        "side (4-256)")
    add_job_args(p)
    p.add_argument("--recursive", action="store_true", help="search directories recursively")
    add_model_args(p, checkpoint=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..io.cams import parse_cam_size
    from ..io.images import collect_images
    from ..jobs.labels import label_batch
    from ..jobs.manifest import file_identity, make_manifest, tse_identity, vocabulary_record
    from ..jobs.outputs import is_done, write_result
    from ..jobs.runner import ImageJob, pending
    from ..vocab import Vocabulary, parse_class_list
    from ..weights import load_clip

    try:
        cam_size = parse_cam_size(args.cam_size)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    inputs, overrides = split_overrides(args.inputs)
    overrides = [*args.overrides, *overrides]
    if not inputs:
        raise CliError("give at least one image file, directory or glob pattern")
    ckpt = load_checkpoint_arg(args)
    base = ckpt.config if ckpt is not None else None
    config_from_args(args, overrides=overrides, base=base)  # bad settings fail here, before any model is loaded
    if args.classes is None and args.vocabulary is None and ckpt is None:
        raise CliError("give --classes (e.g. --classes 'cat,dog') or --vocabulary")
    classes = parse_class_list(args.classes) if args.classes is not None else None
    if args.vocabulary is not None:
        vocab = Vocabulary.from_spec(args.vocabulary)
    elif ckpt is not None:
        named = ckpt.meta.get("vocabulary")
        vocab = Vocabulary.named(named) if named in ("voc", "coco") else Vocabulary.from_names(ckpt.class_names)
    else:
        vocab = Vocabulary.from_names(classes)
    if classes is not None:
        vocab.indices(classes)  # unknown names fail here, before any model is loaded
    paths = collect_images(inputs, recursive=args.recursive)
    out_dir = out_dir_arg(args)
    check_writable(out_dir)
    stems = unique_stems(paths)
    device = resolve_device(args.device)
    clip = load_clip(clip_spec_arg(args, ckpt), device=device)
    cfg = config_from_args(args, clip, overrides, base)  # default: the checkpoint's / these weights' settings
    manifest = make_manifest(
        "cam", cfg, classes=classes, vocabulary=vocabulary_record(vocab), clip=clip.identity,
        checkpoint=file_identity(args.checkpoint) if ckpt is not None else None,
        tse=tse_identity(args.bank, args.knowledge, args.clusters), precision=args.precision,
        outputs={"overlay": True, "save_cams": args.save_cams, "cam_size": args.cam_size if args.save_cams else None})
    finished = (lambda s: is_done(out_dir, s, args.save_cams, overlay=True))
    done = sum(map(finished, stems)) if out_dir.is_dir() else 0
    resumed = check_run_folder(out_dir, manifest, overwrite=args.overwrite, done=done, total=len(stems))
    todo, skipped = pending(paths, stems, out_dir, finished, args.overwrite or not resumed)
    if not todo:
        return 0
    warn_unknown_classes(clip, classes if classes is not None else vocab.names)
    predictor = cam_predictor(args, clip, vocab, cfg, device, ckpt)
    commit_run_folder(out_dir, manifest, cfg, resumed, clip=clip.identity, command="cam",
                      **({"checkpoint": str(args.checkpoint)} if ckpt is not None else {}))
    job = ImageJob(len(todo), "cam", out_dir, skipped, overlap=not args.no_overlap)
    for batch in job.batches(todo, args.batch_size):
        for (path, stem, rgb), out in zip(batch, label_batch(predictor, batch, lambda _: classes)):
            job.write(path, lambda stem=stem, rgb=rgb, result=out.result:
                      write_result(out_dir, stem, rgb, result, args.save_cams, cam_size))
    return job.finish()
