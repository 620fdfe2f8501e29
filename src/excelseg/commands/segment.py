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
    batch_size_arg,
    check_writable,
    config_from_args,
    open_dataset_args,
    out_dir_arg,
    scales_arg,
    setting_arg,
    size_arg,
    split_overrides,
    unique_stems,
    write_resolved_config,
)

EXAMPLES = """examples:
  excelseg segment photos/ --checkpoint voc_heads.safetensors --out-dir seg/
  excelseg segment 'val/*.jpg' --checkpoint voc_heads.safetensors --clip ~/weights/ViT-B-16.pt --crf --single-scale
  excelseg segment test/ --checkpoint voc_heads.safetensors --voc-test-submission --out-dir submit/
  excelseg segment --dataset voc --root ~/data/VOCdevkit --split val --checkpoint voc_heads.safetensors --crf
  excelseg segment --dataset coco --root ~/data/coco --split val_part --checkpoint coco_heads.safetensors --save-logits

Outputs per image: <stem>.png (palette label of the multi-scale + flip prediction: 0 = background, i = i-th class
of the checkpoint), with --single-scale <stem>_ss.png (scale 1.0, no flip), with --crf <stem>_crf.png (after the
dense CRF), with --save-logits <stem>_logits.npz (float16 averaged logits, at segment.logits_scale × the image
size, and the class names). --voc-test-submission writes results/VOC2012/Segmentation/comp6_test_cls/<stem>.png
(the evaluation server's layout; tar it from the output folder). 'excelseg eval --pred DIR' prints one row per
variant found. Finished images are skipped on a re-run (--overwrite redoes them); files are written atomically.
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
    add_job_args(o)
    o.add_argument("--recursive", action="store_true", help="search directories recursively")
    g = p.add_argument_group("model")
    add_clip_arg(g, "CLIP weights the heads were trained with (default: the open_clip tag the checkpoint "
                    "records; a weight file must be given)")
    add_config_arg(g, "settings (default: those stored in the checkpoint); section.key=value words override")
    g.add_argument("--size", type=setting_arg("cam.size", size_arg), default=None, help="base input N or HxW (= cam.size; paper: 320)")
    g.add_argument("--scales", type=setting_arg("segment.scales", scales_arg), default=None,
                   help="scales × --size (= segment.scales; paper: 1,0.7,1.2,1.5)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average flipped logits (= segment.flip; paper: on)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--batch-size", type=batch_size_arg, default=1, help="images per forward (default 1)")
    add_dataset_args(p, "eval", workers_help="unused (images are read in the main process)")
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
    return names


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..io.checkpoint import CheckpointError, check_checkpoint, load_checkpoint
    from ..io.images import collect_images
    from ..jobs.runner import ImageJob, pending
    from ..weights import load_clip

    inputs, overrides = split_overrides(args.inputs)
    overrides = [*args.overrides, *overrides]
    use_dataset = args.root is not None or args.index is not None
    if not inputs and not use_dataset:
        raise CliError("give image files, directories or glob patterns, or a prepared dataset (--root/--index)")
    if inputs and use_dataset:
        raise CliError("give either images or a dataset (--root/--index), not both")
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    # bad settings fail here, before the CLIP is loaded
    cfg = config_from_args(args, overrides=overrides, base=ckpt.config, flags=SEGMENT_FLAGS)
    if cfg.segment.crf:
        from ..crf import require_crf

        try:
            require_crf()
        except ImportError as exc:
            raise CliError(f"{exc}; or run without --crf (segment.crf=false)") from None
    if use_dataset:  # outputs named by image id, so 'excelseg eval' finds them
        ds = open_dataset_args(args, "eval")
        try:
            check_checkpoint(ckpt, class_names=ds.class_names)
        except CheckpointError as exc:
            raise CliError(str(exc)) from None
        paths, stems = [ds.image_path(i) for i in ds.ids], list(ds.ids)
    else:
        paths = collect_images(inputs, recursive=args.recursive)
        stems = unique_stems(paths)
    out_dir = out_dir_arg(args)
    check_writable(out_dir)
    names = {s: output_names(s, args, cfg.segment.crf) for s in stems}
    todo, skipped = pending(paths, stems, out_dir, lambda s: all((out_dir / n).is_file() for n in names[s]),
                            args.overwrite)
    if not todo:
        return 0
    device = resolve_device(args.device)
    spec = args.clip
    if spec is None:
        if ckpt.clip_identity.startswith("sha256:"):
            raise CliError(f"{args.checkpoint} was made with the CLIP weight file {ckpt.clip_identity}; "
                           "give that file with --clip")
        spec = ckpt.clip_identity
    clip = load_clip(spec, device=device)
    try:
        check_checkpoint(ckpt, clip.identity)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    from ..segmenter import Segmenter

    segmenter = Segmenter(clip, ckpt.heads(), ckpt.class_names, config=cfg, device=device)
    write_resolved_config(out_dir, cfg, clip=clip.identity, checkpoint=str(args.checkpoint), command="segment",
                          classes=",".join(ckpt.class_names))
    job = ImageJob(len(todo), "segment", out_dir, skipped, overlap=not args.no_overlap)
    for batch in job.batches(todo, args.batch_size):
        try:
            results = segmenter.predict_batch([rgb for _, _, rgb in batch], crf=cfg.segment.crf,
                                              single_scale=args.single_scale)
        except ValueError as exc:  # e.g. an input smaller than one patch at some scale
            raise CliError(str(exc)) from None
        for (path, stem, _), res in zip(batch, results):
            job.write(path, lambda stem=stem, res=res: write_outputs(args, cfg, [out_dir / n for n in names[stem]], res))
    return job.finish()


def write_outputs(args: argparse.Namespace, cfg, files: list[Path], res) -> None:
    """One image's label PNGs (and logits) in the order of :func:`output_names`."""
    import numpy as np

    from ..io.files import save_label_png, save_npz

    if args.voc_test_submission:
        save_label_png(files[0], res.label)
        return
    save_label_png(files[0], res.label if res.label_no_crf is None else res.label_no_crf)
    rest = files[1:]
    if args.single_scale:
        save_label_png(rest.pop(0), res.label_single_scale)
    if cfg.segment.crf:
        save_label_png(rest.pop(0), res.label)
    if args.save_logits:
        save_npz(rest.pop(0), logits=res.logits.numpy().astype(np.float16),
                 class_names=np.array(["background", *res.class_names]), size=np.array(res.image_size, dtype=np.int64))
