"""Train ExCEL's adapter and decoder on image-level labels (single stage, EXCEL_SPEC §5): the frozen CLIP makes
pseudo-labels from its calibrated CAMs, the heads learn from them; after train.lvc_switch_iter the pseudo-labels
come from the adapter-shifted (LVC) CAMs. Seeded, resumable, AMP on CUDA, torchrun DDP, TensorBoard."""

from __future__ import annotations

import argparse

from .common import (
    OVERRIDE_RE,
    CliError,
    add_dataset_args,
    add_out_dir,
    clusters_arg,
    config_from_args,
    out_dir_arg,
    ranged,
    setting_arg,
)
from .run_folder import check_writable, commit_run_folder

SYNTHETIC = "synthetic"  # = excelseg.data.SYNTHETIC, not imported here: commands load at CLI start, data needs torch

EXAMPLES = """examples:
  excelseg train --config voc --root ~/data/VOCdevkit --bank voc_bank.pth --out-dir runs/voc
  excelseg train --config coco --dataset coco --root ~/data/coco --bank coco_bank.pth --out-dir runs/coco
  excelseg train --config voc --root ~/data/VOCdevkit --out-dir runs/voc --resume       # continue a run
  excelseg train --config voc --root ~/data/VOCdevkit --out-dir runs/small train.accumulation=2 train.amp=fp16
  excelseg train --config synthetic --out-dir runs/synthetic      # offline: generated scenes, shipped synthetic CLIP
  torchrun --nproc-per-node 2 -m excelseg.cli train --config voc --root ~/data/VOCdevkit --out-dir runs/ddp

Settings are the 'train' section of the config (train.iterations, train.batch_size, train.lr, train.val_every,
train.checkpoint_every, train.gt_guided_crop, ...); any section.key=value word overrides one. The run folder gets
checkpoints/iter_NNNNNN.safetensors (+ .state.pt), latest.json, train.log, tb/ (TensorBoard) and the resolved
config. Ctrl-C finishes the iteration, writes a checkpoint and exits (130); --resume continues exactly.
Exit status: 0 done, 2 bad input or a stopped run (non-finite loss, unwritable disk), 130 interrupted."""


def register(sub) -> None:
    p = sub.add_parser("train", help="train the LVC adapter and decoder from image-level labels",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--clip", default=None, help="CLIP weights (as for 'excelseg cam'; default ViT-B-16 OpenAI, "
                                               "synthetic for --dataset synthetic)")
    g.add_argument("--bank", default=None, help="TSE attribute bank (.pth reference format, .safetensors, .npz)")
    g.add_argument("--knowledge", default=None, help="knowledge base instead of a bank (voc, coco or a JSON file)")
    g.add_argument("--clusters", type=clusters_arg, default=None, help="attribute clusters B for --knowledge (N or auto)")
    g.add_argument("--config", default=None, metavar="NAME|YAML",
                   help="settings: voc (default), coco, synthetic or a YAML file; section.key=value overrides")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default; torchrun: cuda:LOCAL_RANK)")
    add_dataset_args(p, "train", workers_help="DataLoader worker processes", extra_kinds=(SYNTHETIC,),
                     default_kind=None, kind_help="dataset kind (default train.dataset: voc; synthetic in "
                                                  "--config synthetic: generated scenes, no --root needed)")
    p.add_argument("--val-split", default=None,
                   help="in-training validation split (default train.val_split; 'none' = no validation)")
    add_out_dir(p, None, "run folder: checkpoints, latest.json, train.log, tb/")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from a checkpoint: the run folder's latest.json (no value), a run folder, "
                        "latest.json or a checkpoint .safetensors")
    p.add_argument("--force", action="store_true", help="resume even if the config changed (differences logged)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run (its checkpoints, log and events are deleted)")
    p.add_argument("--seed", type=setting_arg("train.seed", int), default=None,
                   help="random seed (= train.seed; default 0)")
    p.add_argument("--iterations", type=ranged(int, 1), default=None,
                   help="stop after this many iterations in total (the schedule keeps train.iterations)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    import torch

    from ..build import build_model
    from ..config import ConfigError
    from ..data import GENERATED_KINDS, open_dataset
    from ..devices import resolve_device
    from ..jobs.manifest import make_manifest, tse_identity
    from ..train import Trainer, TrainingError, latest_checkpoint
    from ..train.dist import DistInfo, device_for_rank, init_distributed
    from ..vocab import dataset_vocabulary
    from ..weights import load_clip

    if args.resume and OVERRIDE_RE.match(args.resume):  # "--resume train.x=y": the word is a setting
        args.overrides, args.resume = [*args.overrides, args.resume], ""
    pairs = list(args.overrides)
    if args.seed is not None:
        pairs.append(("train.seed", args.seed))
    cfg = config_from_args(args, overrides=pairs)  # bad settings fail before anything is loaded
    t = cfg.train
    out_dir = out_dir_arg(args)
    if args.overwrite and args.resume is not None:
        raise CliError("--resume continues a run and --overwrite starts it over: give one of them")
    dist = DistInfo.from_env()
    if dist.main:
        check_writable(out_dir)
        if args.resume is None:
            _check_fresh(out_dir, args.overwrite)
    if args.resume is not None:  # something to resume, before anything is loaded
        try:
            latest_checkpoint(args.resume or out_dir)
        except (TrainingError, ValueError, OSError) as exc:
            raise CliError(str(exc)) from None
    kind = args.dataset or t.dataset
    if kind not in GENERATED_KINDS and args.root is None and args.index is None:
        raise CliError("give --root (the prepared dataset) or --index")
    try:
        train_ds = open_dataset(kind, root=args.root, split=args.split or t.train_split, index=args.index,
                                with_mask=False)
        val_split = args.val_split or t.val_split
        val_ds = None
        if val_split != "none" and t.val_every > 0:
            val_ds = open_dataset(kind, root=args.root, split=val_split, index=args.index)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        raise CliError(str(exc)) from None
    device = resolve_device(device_for_rank(args.device))
    init_distributed(dist, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # generated scenes go with the CLIP trained on them unless --clip says otherwise
    clip = load_clip(args.clip if args.clip is not None else GENERATED_KINDS.get(kind), device=device)
    cfg = config_from_args(args, clip, pairs)
    vocab = dataset_vocabulary(train_ds.class_names, train_ds.kind)
    bank = args.bank
    knowledge = args.knowledge
    if kind in GENERATED_KINDS and bank is None and knowledge is None:  # TSE from the weights' own knowledge base
        knowledge = clip.default_knowledge
    torch.manual_seed(cfg.train.seed)  # the heads' initialisation follows --seed (the reference seeds first)
    model = build_model(clip, vocabulary=vocab, bank=bank, knowledge=knowledge, clusters=args.clusters,
                        config=cfg, trainable=True, device=device)
    model.own_text_features()  # the class features, computed before training starts
    meta = {"clip": clip.identity, "dataset": train_ds.kind, "class_names": list(train_ds.class_names),
            "bank": str(args.bank) if args.bank else None, "knowledge": knowledge}
    tse = tse_identity(args.bank, knowledge, args.clusters)
    manifest = make_manifest("train", cfg, classes=list(train_ds.class_names), clip=clip.identity,
                             dataset={"kind": train_ds.kind, "split": train_ds.split}, tse=tse)
    try:
        trainer = Trainer(model, cfg, train_ds, out_dir, val_ds=val_ds, device=device, workers=args.workers,
                          dist=dist, metadata=meta, progress=False if args.no_progress else None)
        if args.resume is not None:  # every check first: a refused resume writes nothing
            source = args.resume or out_dir
            _check_resume(source, manifest, args.force)
            trainer.resume(source, force=args.force)
        elif args.overwrite and dist.main:
            _clear_run(out_dir)
        if dist.main:
            commit_run_folder(out_dir, manifest, cfg, False, clip=clip.identity, command="train",
                              dataset=train_ds.kind, split=train_ds.split)
        last = trainer.fit(args.iterations)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.main:
        print(f"done: {trainer.iteration} iterations; checkpoint {last}")
    return 0


RUN_FILES = ("latest.json", "train.log")
RUN_FOLDERS = ("checkpoints", "tb")


def _check_fresh(out_dir, overwrite: bool) -> None:
    """A new run (no --resume) into a folder that holds one is refused unless --overwrite."""
    from ..jobs.manifest import MANIFEST_NAME

    held = [n for n in (*RUN_FILES, MANIFEST_NAME) if (out_dir / n).is_file()]
    held += [n for n in RUN_FOLDERS if (out_dir / n).is_dir() and any((out_dir / n).iterdir())]
    if held and not overwrite:
        raise CliError(f"{out_dir} holds a training run ({', '.join(held)}): --resume continues it, --overwrite "
                       "starts it over (its checkpoints are deleted), or choose another --out-dir")


def _clear_run(out_dir) -> None:
    """--overwrite: remove the previous run's checkpoints, pointer, log and TensorBoard events."""
    import shutil

    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def _check_resume(source, manifest: dict, force: bool) -> None:
    """Before anything is written: the checkpoint to resume must have been made with the same CLIP and classes,
    and (unless --force) the run folder's manifest must agree on the dataset and the TSE bank. The settings are
    compared by the trainer (:meth:`~excelseg.train.Trainer.resume`)."""
    from pathlib import Path

    from ..io.checkpoint import CheckpointError, load_checkpoint, same_clip
    from ..jobs.manifest import describe_differences, differences, read_manifest
    from ..train import TrainingError, latest_checkpoint

    try:
        ck = latest_checkpoint(source)
        heads = load_checkpoint(ck["heads"])
    except (TrainingError, CheckpointError, FileNotFoundError, ValueError) as exc:
        raise CliError(f"cannot resume: {exc}") from None
    if not same_clip(heads.clip_identity, manifest["clip"]):
        raise CliError(f"cannot resume: {ck['heads']} was trained with CLIP {heads.clip_identity}, this run loads "
                       f"{manifest['clip']} (give the same --clip)")
    if list(heads.class_names) != list(manifest["classes"]):
        raise CliError(f"cannot resume: {ck['heads']} was trained for the classes {', '.join(heads.class_names[:5])}"
                       f"…, this run's dataset has {', '.join(manifest['classes'][:5])}… (give the same dataset)")
    try:
        stored = read_manifest(Path(ck["heads"]).parent.parent)
    except ValueError:
        stored = None
    if stored is None:
        return
    diffs = [d for d in differences(stored, manifest) if not d[0].startswith("settings.")]
    if diffs and not force:
        raise CliError(f"cannot resume: the run was made with {describe_differences(diffs)} (give the same "
                       "options, or --force to resume anyway)")


__all__ = ["register", "run"]
