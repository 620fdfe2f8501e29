"""Segment images with trained ExCEL heads: multi-scale + flip, optional dense CRF (excelseg segment).

The frozen CLIP is loaded from its own weights (--clip; default the tag the checkpoint records); the checkpoint
(adapter + decoder, 'excelseg import-checkpoint' or the trainer) is refused with other CLIP weights. Settings
default to those stored in the checkpoint: scales 0.7, 1.0, 1.2, 1.5 × --size (320) with flip; the VOC preset
skips the flip at scale 1.0 as the reference's infer_seg_voc.py does, the COCO preset flips every scale, keeps
the logits at 0.2× the image size and runs the CRF."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    SEGMENT_FLAGS,
    CliError,
    add_clip_arg,
    add_config_arg,
    add_dataset_args,
    add_job_args,
    add_out_dir,
    add_view_args,
    batch_size_arg,
    clip_spec_arg,
    config_from_args,
    open_dataset_args,
    out_dir_arg,
    split_overrides,
)
from .run_folder import check_run_folder, check_writable, commit_run_folder, unique_stems

EXAMPLES = """examples:
  excelseg segment photos/ --checkpoint voc_heads.safetensors --out-dir seg/
  excelseg segment 'val/*.jpg' --checkpoint voc_heads.safetensors --clip ~/weights/ViT-B-16.pt --crf --single-scale
  excelseg segment test/ --checkpoint voc_heads.safetensors --voc-test-submission --out-dir submit/
  excelseg segment --dataset voc --root ~/data/VOCdevkit --split val --checkpoint voc_heads.safetensors --crf
  excelseg segment --dataset coco --root ~/data/coco --split val_part --checkpoint coco_heads.safetensors --save-logits

Outputs per image: <stem>.png (palette label of the multi-scale + flip prediction: 0 = background, i = i-th class
of the checkpoint), with --single-scale <stem>_ss.png (scale 1.0, no flip), with --crf <stem>_crf.png (after the
dense CRF), with --save-logits <stem>_logits.npz (float16 averaged logits, at segment.logits_scale × the image
size, and the class names), for image files (or with --overlay) <stem>_overlay.jpg (label colours + legend).
--voc-test-submission writes results/VOC2012/Segmentation/comp6_test_cls/<stem>.png (the evaluation server's
layout; tar it from the output folder). 'excelseg eval --pred DIR' prints one row per variant found.
<stem>: the file stem, or where inputs share one their relative path (and extension) - see docs/cli-and-weights.md.
Finished images of the same run are skipped on a re-run; the folder's excelseg_run.json records the run, and a
re-run with other settings is refused (--overwrite redoes everything); files are written atomically.
Exit status: 0 all done, 1 some images failed (listed at the end), 2 usage/setup error."""

SUBMISSION_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"


def register(sub) -> None:
    p = sub.add_parser("segment", help="segment images with trained heads (multi-scale + flip, optional CRF)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, directories or glob patterns (or a prepared dataset: --root/--index); "
                        "section.key=value words override settings")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="excelseg heads checkpoint (.safetensors; a reference .pth converts with "
                        "'excelseg import-checkpoint')")
    add_out_dir(p, "excelseg_segment", "folder for the per-image outputs")
    o = p.add_argument_group("outputs")
    o.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="also write the dense-CRF label <stem>_crf.png (= segment.crf; needs the [crf] extra)")
    o.add_argument("--single-scale", action="store_true",
                   help="also write <stem>_ss.png from the scale-1.0 logits alone (no extra forward)")
    o.add_argument("--save-logits", action="store_true", help="also write float16 <stem>_logits.npz")
    o.add_argument("--voc-test-submission", action="store_true",
                   help="write only the labels, in the VOC evaluation server's folder layout")
    o.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=None,
                   help="also write <stem>_overlay.jpg: the image with the label colours and a legend (default: on "
                        "for image files, off for a dataset)")
    add_job_args(o)
    o.add_argument("--recursive", action="store_true", help="search directories recursively")
    g = p.add_argument_group("model")
    add_clip_arg(g, "CLIP weights the heads were trained with (default: the open_clip tag the checkpoint "
                    "records; a weight file must be given)")
    add_config_arg(g, "settings (default: those stored in the checkpoint); section.key=value words override")
    add_view_args(g, "segment", size="base input N or HxW (= cam.size; paper: 320)",
                  scales="scales × --size (= segment.scales; paper: 1,0.7,1.2,1.5)",
                  flip="average flipped logits (= segment.flip; paper: on)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--batch-size", type=batch_size_arg, default=1, help="images per forward (default 1)")
    add_dataset_args(p, "eval", workers_help="DataLoader processes decoding images")
    p.set_defaults(func=run, overrides=[])


def output_names(stem: str, args: argparse.Namespace, crf: bool) -> list[str]:
    """Relative paths of one image's outputs (the first is the main label)."""
    if args.voc_test_submission:
        return [str(SUBMISSION_DIR / f"{stem}.png")]
    names = [f"{stem}.png"]
    if args.single_scale:
        names.append(f"{stem}_ss.png")
    if crf:
        names.append(f"{stem}_crf.png")
    if args.save_logits:
        names.append(f"{stem}_logits.npz")
    if args.overlay:
        names.append(f"{stem}_overlay.jpg")
    return names


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..io.checkpoint import CheckpointError, check_checkpoint, load_checkpoint
    from ..io.images import collect_images
    from ..jobs.manifest import file_identity, make_manifest
    from ..jobs.runner import ImageJob, pending, read_rgb
    from ..weights import load_clip

    inputs, overrides = split_overrides(args.inputs)
    overrides = [*args.overrides, *overrides]
    from ..data import GENERATED_KINDS

    use_dataset = args.root is not None or args.index is not None or args.dataset in GENERATED_KINDS
    if not inputs and not use_dataset:
        raise CliError("give image files, directories or glob patterns, or a prepared dataset (--root/--index)")
    if inputs and use_dataset:
        raise CliError("give either images or a dataset (--root/--index), not both")
    if args.overlay is None:  # overlays for looking at images; a dataset's predictions are for scoring
        args.overlay = not use_dataset and not args.voc_test_submission
    if args.overlay and args.voc_test_submission:
        raise CliError("--voc-test-submission writes only the labels: drop --overlay")
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the checkpoint {args.checkpoint} ({exc.strerror or exc})") from None
    # bad settings fail here, before the CLIP is loaded
    cfg = config_from_args(args, overrides=overrides, base=ckpt.config, flags=SEGMENT_FLAGS)
    if cfg.segment.crf:
        from ..crf import require_crf

        try:
            require_crf()
        except ImportError as exc:
            raise CliError(f"{exc}; or run without --crf (segment.crf=false)") from None
    load = read_rgb
    dataset = None
    if use_dataset:  # outputs named by image id, so 'excelseg eval' finds them
        ds = open_dataset_args(args, "eval")
        try:
            check_checkpoint(ckpt, class_names=ds.class_names)
        except CheckpointError as exc:
            raise CliError(str(exc)) from None
        paths, stems, load = list(ds.ids), list(ds.ids), ds.load_image
        dataset = {"kind": ds.kind, "split": ds.split}
    else:
        paths = collect_images(inputs, recursive=args.recursive)
        stems = unique_stems(paths)
    out_dir = out_dir_arg(args)
    check_writable(out_dir)
    names = {s: output_names(s, args, cfg.segment.crf) for s in stems}
    device = resolve_device(args.device)
    clip = load_clip(clip_spec_arg(args, ckpt), device=device)
    try:
        check_checkpoint(ckpt, clip.identity)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    manifest = make_manifest(
        "segment", cfg, classes=list(ckpt.class_names), clip=clip.identity, checkpoint=file_identity(args.checkpoint),
        dataset=dataset, outputs={"single_scale": args.single_scale, "save_logits": args.save_logits,
                                  "voc_test_submission": args.voc_test_submission, "overlay": args.overlay})
    finished = (lambda s: all((out_dir / n).is_file() for n in names[s]))
    done = sum(map(finished, stems)) if out_dir.is_dir() else 0
    resumed = check_run_folder(out_dir, manifest, overwrite=args.overwrite, done=done, total=len(stems))
    todo, skipped = pending(paths, stems, out_dir, finished, args.overwrite or not resumed)
    if not todo:
        return 0
    from ..segmenter import Segmenter

    segmenter = Segmenter(clip, ckpt.heads(), ckpt.class_names, config=cfg, device=device)
    commit_run_folder(out_dir, manifest, cfg, resumed, clip=clip.identity, checkpoint=str(args.checkpoint),
                      command="segment", classes=",".join(ckpt.class_names))
    job = ImageJob(len(todo), "segment", out_dir, skipped, overlap=not args.no_overlap)
    for batch in job.batches(todo, args.batch_size, load=load, workers=args.workers):
        try:
            results = segmenter.predict_batch([rgb for _, _, rgb in batch], crf=cfg.segment.crf,
                                              single_scale=args.single_scale)
        except ValueError as exc:  # e.g. an input smaller than one patch at some scale
            raise CliError(str(exc)) from None
        for (path, stem, rgb), res in zip(batch, results):
            job.write(path, lambda stem=stem, rgb=rgb, res=res:
                      write_outputs(args, cfg, [out_dir / n for n in names[stem]], res, rgb))
    return job.finish()


def write_outputs(args: argparse.Namespace, cfg, files: list[Path], res, rgb=None) -> None:
    """One image's label PNGs (and logits, overlay) in the order of :func:`output_names`."""
    import numpy as np

    from ..io.files import save_label_png, save_npz

    if args.voc_test_submission:
        save_label_png(files[0], res.label)
        return
    rest = files[1:]
    if args.single_scale:
        save_label_png(rest.pop(0), res.label_single_scale)
    crf_file = rest.pop(0) if cfg.segment.crf else None
    if args.save_logits:
        save_npz(rest.pop(0), logits=res.logits.numpy().astype(np.float16),
                 class_names=np.array(["background", *res.class_names]), size=np.array(res.image_size, dtype=np.int64))
    if args.overlay:
        save_overlay(rest.pop(0), rgb, res.label, res.class_names)
    if crf_file is not None:
        save_label_png(crf_file, res.label)
    # the main label last: its presence (with the others) marks the image done
    save_label_png(files[0], res.label if res.label_no_crf is None else res.label_no_crf)


def save_overlay(path: Path, rgb, label, class_names) -> None:
    """The image with the label colours and a legend, at most :data:`~excelseg.jobs.outputs.OVERLAY_MAX_SIDE`."""
    import numpy as np
    from PIL import Image

    from ..io.files import save_jpeg
    from ..jobs.outputs import OVERLAY_MAX_SIDE
    from ..viz import overlay

    h, w = label.shape
    f = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    if f < 1:
        size = (max(1, round(w * f)), max(1, round(h * f)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    save_jpeg(path, overlay(rgb, label, {0: "background", **{i + 1: n for i, n in enumerate(class_names)}}))
