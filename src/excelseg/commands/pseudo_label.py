"""Training-free pseudo-labels for a whole prepared dataset (excelseg pseudo-label; paper protocol, EXCEL_SPEC §6).

Every image of the split gets the CAMs and label of the classes in its image-level label (--all-classes: every
class competes), aligned against the dataset's class list (voc, coco, or the folder dataset's classes) plus the
paper's background words. Label values: 0 = background, i = the i-th class of the dataset (what 'excelseg eval'
scores)."""

from __future__ import annotations

import argparse

from .common import (
    CliError,
    add_dataset_args,
    add_job_args,
    add_model_args,
    add_out_dir,
    cam_predictor,
    clip_spec_arg,
    config_from_args,
    load_checkpoint_arg,
    open_dataset_args,
    out_dir_arg,
    warn_unknown_classes,
)
from .run_folder import check_run_folder, check_writable, commit_run_folder

EXAMPLES = """examples:
  excelseg prepare --dataset voc --root ~/data/VOCdevkit
  excelseg pseudo-label --dataset voc --root ~/data/VOCdevkit --split train --out-dir out/voc_train --save-cams
  excelseg eval --pred out/voc_train --root ~/data/VOCdevkit --split train
  excelseg eval-cams --cams out/voc_train --root ~/data/VOCdevkit
  excelseg pseudo-label --dataset coco --root ~/data/coco --split train --config coco --out-dir out/coco_train \\
      --knowledge coco --batch-size 16 --workers 8 --device cuda
  torchrun --standalone --nproc_per_node 4 -m excelseg.cli pseudo-label --dataset voc --root ~/data/VOCdevkit \\
      --split train_aug --out-dir out/voc_train_aug --batch-size 16 --workers 4
  excelseg pseudo-label --dataset voc --root ~/data/VOCdevkit --split train_aug --out-dir out/aug --shard 1/3
  excelseg pseudo-label --root ~/data/VOCdevkit --out-dir out/flip cam.flip=true cam.scales=[1,0.75]

Outputs in --out-dir: <id>.png (palette label: 0 = background, i = i-th class, the VOC palette) and, with --save-cams,
<id>_cams.npz: float16 'cams' K×h×w in [0, 1] of the K present classes at a REDUCED size (--cam-size: the patch
grid, 20×20 for --size 320, i.e. K × 800 bytes; or N = longer side), 'class_ids', 'class_names' and 'size' (the
original H, W; excelseg.io.cams.read_cam_archive upsamples to it).

Sharding: with torchrun (RANK / WORLD_SIZE set) or --shard i/n, each process takes sorted(ids)[i::n] of the split
(disjoint, nothing missing; no process group is created) and, on CUDA, the GPU cuda:LOCAL_RANK. All shards write to
the same --out-dir; score the union with 'excelseg eval' once every process has finished.

Resume: the folder's run manifest (excelseg_run.json) records the dataset, split, classes, CLIP, bank and
settings; a re-run of the same run skips images whose outputs exist before any decoding, one with other settings
is refused (--overwrite redoes them); every file is written atomically and temporary files a killed run left
behind are removed. Exit status: 0 all done, 1 some
images failed (unreadable or missing files; listed at the end), 2 usage/setup error (e.g. a split without
image-level labels, such as VOC test, unless --all-classes).

CPU: on a shared or busy machine one torch thread per process (OMP_NUM_THREADS=1, which torchrun sets) measured up
to 9x faster than torch's default thread count (benchmarks/pseudo_label_throughput.py)."""



def register(sub) -> None:
    p = sub.add_parser("pseudo-label", help="training-free pseudo-labels (and CAMs) for every image of a dataset",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = add_dataset_args(p, "pseudo-label", workers_help="DataLoader processes decoding images")
    d.add_argument("--shard", default=None,
                   help="i/n: label only sorted(ids)[i::n] (default: RANK/WORLD_SIZE when set, e.g. by torchrun)")
    o = p.add_argument_group("outputs")
    add_out_dir(o, None, "folder for <id>.png (and <id>_cams.npz)")
    o.add_argument("--save-cams", action="store_true",
                   help="also write float16 <id>_cams.npz at a reduced size (see --cam-size)")
    o.add_argument("--cam-size", default="grid",
                   help="size of the stored CAMs: 'grid' (the patch grid, default) or N = longer side (4-256)")
    o.add_argument("--crf", action="store_true",
                   help="dense CRF on the [bg, cams] probabilities at full size, reference parameters "
                        "(needs the [crf] extra: pip install 'excelseg[crf]')")
    o.add_argument("--all-classes", action="store_true",
                   help="let every class compete in every image instead of its image-level labels (the only way "
                        "to label a split without labels, e.g. VOC test)")
    add_job_args(o)
    add_model_args(p, checkpoint=True)
    p.set_defaults(func=run)


def _check_labels(ds, all_classes: bool) -> None:
    from ..data.index import examples

    if not hasattr(ds, "index"):  # generated scenes: every scene knows its classes
        return
    known = ds.index.get("labels") or {}
    unlabeled = [name for name in ds.ids if name not in known]
    if unlabeled and not all_classes:
        raise CliError(f"{len(unlabeled)} of {len(ds.ids)} images of {ds.kind} {ds.split} have no image-level labels "
                       f"({examples(unlabeled, 3)}); pseudo-labels look for each image's labelled classes (the "
                       "paper's protocol): pass --all-classes to let every class compete")


def run(args: argparse.Namespace) -> int:
    from ..crf import REFERENCE_CRF, require_crf
    from ..devices import resolve_device
    from ..io.cams import cam_archive, parse_cam_size
    from ..jobs.labels import label_batch
    from ..jobs.manifest import file_identity, make_manifest, tse_identity, vocabulary_record
    from ..jobs.outputs import is_done, stale_temps_of, write_outputs
    from ..jobs.runner import ImageJob, Shard
    from ..train.dist import device_for_rank
    from ..vocab import dataset_vocabulary
    from ..weights import load_clip

    overrides = args.overrides  # section.key=value words
    ckpt = load_checkpoint_arg(args)
    base = ckpt.config if ckpt is not None else None
    config_from_args(args, overrides=overrides, base=base)  # bad settings fail here, before any model is loaded
    try:
        cam_size = parse_cam_size(args.cam_size)
        shard = Shard.parse(args.shard) if args.shard is not None else (Shard.from_env() or Shard())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.crf:
        try:
            require_crf()
        except ImportError as exc:
            raise CliError(str(exc)) from None
    ds = open_dataset_args(args, "pseudo-label", with_mask=False)
    _check_labels(ds, args.all_classes)
    vocab = dataset_vocabulary(ds.class_names, ds.kind)
    out_dir = out_dir_arg(args)
    check_writable(out_dir)

    names = shard.select(ds.ids)
    where = f" (shard {shard}: {len(names)} of {len(ds.ids)})" if shard.world > 1 else ""
    device = resolve_device(device_for_rank(args.device))
    clip = load_clip(clip_spec_arg(args, ckpt), device=device)
    cfg = config_from_args(args, clip, overrides, base)
    manifest = make_manifest(
        "pseudo-label", cfg, dataset={"kind": ds.kind, "split": ds.split}, classes=list(ds.class_names),
        all_classes=args.all_classes, vocabulary=vocabulary_record(vocab), clip=clip.identity,
        checkpoint=file_identity(args.checkpoint) if ckpt is not None else None,
        tse=tse_identity(args.bank, args.knowledge, args.clusters), precision=args.precision, crf=args.crf,
        outputs={"save_cams": args.save_cams, "cam_size": args.cam_size if args.save_cams else None})
    done = sum(is_done(out_dir, n, args.save_cams) for n in names) if out_dir.is_dir() else 0
    resumed = check_run_folder(out_dir, manifest, overwrite=args.overwrite, done=done, total=len(names))
    stale = stale_temps_of(out_dir, names)
    if stale:
        print(f"removed {stale} temporary files left by an interrupted run")
    redo = args.overwrite or not resumed
    todo = [n for n in names if redo or not is_done(out_dir, n, args.save_cams)]
    skipped = len(names) - len(todo)
    print(f"{ds.kind} {ds.split}: {len(names)} images{where}; {skipped} already done in {out_dir}"
          + (" (--overwrite redoes them)" if skipped else ""))
    if not todo:
        print(f"done: 0 written, {skipped} skipped, 0 failed -> {out_dir}")
        return 0

    def classes_of(name: str) -> list[str] | None:
        if args.all_classes:
            return None
        return [vocab.names[v - 1] for v in ds.class_ids(name)]

    warn_unknown_classes(clip, vocab.names)
    predictor = cam_predictor(args, clip, vocab, cfg, device, ckpt)
    commit_run_folder(out_dir, manifest, cfg, resumed, clip=clip.identity, command="pseudo-label", dataset=ds.kind,
                      split=ds.split)
    job = ImageJob(len(todo), "pseudo-label" + (f" {shard}" if shard.world > 1 else ""), out_dir, skipped,
                   overlap=not args.no_overlap)
    crf = REFERENCE_CRF if args.crf else None
    for batch in job.batches([(n, n) for n in todo], args.batch_size, load=ds.load_image, workers=args.workers):
        for out in label_batch(predictor, batch, classes_of, crf):
            archive = cam_archive(out.result, cam_size) if args.save_cams else None
            job.write(out.name, lambda out=out, archive=archive: write_outputs(out_dir, out.name, out.label, archive))
    device = f", device {predictor.device}" if predictor.device.type != "cpu" else ""
    return job.finish(device + where)
