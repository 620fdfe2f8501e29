"""Train the small synthetic CLIP contrastively on generated scenes, on CPU (excelseg train-clip).

Scenes and captions come fresh every step from the procedural generator (excelseg.synthetic); the model is an
open_clip CLIP (ViT image tower, patch 8, 96x96; 3-block text tower) whose config is stored in the output file,
so `--clip PATH` loads it. The weights shipped with excelseg (`--clip synthetic`) were made with this command.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

from .common import CliError, DeprecatedAlias, deprecated, ranged

EXAMPLES = """examples:
  excelseg train-clip --out synthetic_clip.safetensors --minutes 25 --batch-size 64 --seed 0 --threads 1
  excelseg train-clip --out quick.safetensors --steps 50 --batch-size 32 --eval-every 25

Writes OUT (fp16 safetensors with the open_clip config in its metadata), OUT's sibling <stem>.json (config,
command, seed, steps, time, final loss, held-out zero-shot accuracy, sha256) and <stem>.log (the training log).
Training stops after --steps or --minutes, whichever comes first; with --steps the learning-rate schedule runs
over the steps and the run is reproducible for a given seed and thread count."""


def register(sub) -> None:
    p = sub.add_parser("train-clip", help="train the small synthetic CLIP on generated scenes (CPU)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # deprecated: always synthetic
    p.add_argument("--out", default="synthetic_clip.safetensors", help="output .safetensors file")
    p.add_argument("--minutes", type=ranged(float, 0, None, low_open=True), default=25.0,
                   help="wall-clock limit in minutes (default 25)")
    p.add_argument("--steps", type=ranged(int, 1), default=None,
                   help="number of steps (default: until --minutes; --minutes, default 25, still applies)")
    p.add_argument("--schedule-steps", type=ranged(int, 1), default=None, metavar="N",
                   help="learning-rate schedule length in steps (default --steps); with --steps M < N the run "
                        "stops after M steps of an N-step schedule (re-makes a run that --minutes stopped early)")
    p.add_argument("--batch-size", dest="batch_size", type=ranged(int, 2), default=64,
                   help="scene/caption pairs per step (default 64)")
    p.add_argument("--batch", dest="batch_size", type=ranged(int, 2), action=DeprecatedAlias, new="--batch-size",
                   help=argparse.SUPPRESS)
    p.add_argument("--seed", type=ranged(int, 0, 2**32 - 1), default=0,
                   help="initialisation and training-scene seed (default 0)")
    p.add_argument("--threads", type=ranged(int, 1, 1024), default=2,
                   help="torch CPU threads (default 2; on a machine shared with other jobs 1 can be much faster)")
    p.add_argument("--lr", type=ranged(float, 0, None, low_open=True), default=5e-4,
                   help="peak learning rate (default 5e-4)")
    p.add_argument("--log-every", type=ranged(int, 1), default=10, help="log the loss every N steps (default 10)")
    p.add_argument("--eval-every", type=ranged(int, 0), default=100,
                   help="held-out zero-shot accuracy every N steps (default 100; 0: only at the end)")
    p.add_argument("--captions", choices=("full", "mixed"), default="full",
                   help="caption wording: full (every attribute, the default) or mixed (also bare class names, "
                        "counts, spatial relations, single attributes)")
    p.add_argument("--hard-negatives", type=ranged(float, 0, 1), default=0.0, metavar="P",
                   help="chance per pair of an extra negative caption with one object swapped for a class "
                        "sharing its colour or shape (default 0)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="continue from these weights (a train-clip file, or 'synthetic'); its architecture, "
                        "sha256 and training record are kept in the output json")
    g = p.add_argument_group("image tower (default: the shipped architecture; not with --init)")
    g.add_argument("--image-size", type=ranged(int, 8, 4096), default=None, help="input side in pixels")
    g.add_argument("--patch-size", type=ranged(int, 1, 256), default=None, help="ViT patch side in pixels")
    g.add_argument("--width", type=ranged(int, 64, 8192), default=None, help="ViT width (a multiple of 64)")
    g.add_argument("--layers", type=ranged(int, 1, 64), default=None, help="ViT blocks")
    p.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16 (twice the size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synthetic.clip_train import SYNTHETIC_CLIP_CONFIG, load_init, train_clip

    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.minutes is not None and args.minutes <= 0:
        raise CliError(f"--minutes must be positive, got {args.minutes}")
    if args.synthetic:
        deprecated("train-clip --synthetic", "train-clip (generated scenes are its only data)")
    if args.batch_size < 2:
        raise CliError(f"--batch-size must be >= 2 (contrastive pairs), got {args.batch_size}")
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {out}")
    if args.schedule_steps is not None and args.schedule_steps < (args.steps or 1):
        raise CliError(f"--schedule-steps must be >= --steps, got {args.schedule_steps}")
    if not 0.0 <= args.hard_negatives <= 1.0:
        raise CliError(f"--hard-negatives must be in [0, 1], got {args.hard_negatives}")
    config = copy.deepcopy(SYNTHETIC_CLIP_CONFIG)
    vision = config["vision_cfg"]
    for key in ("image_size", "patch_size", "width", "layers"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise CliError(f"--{key.replace('_', '-')} must be positive, got {value}")
            vision[key] = value
    if vision["image_size"] % vision["patch_size"] or vision["width"] % vision["head_width"]:
        raise CliError(f"--image-size must be a multiple of --patch-size and --width of {vision['head_width']}, "
                       f"got {vision['image_size']}, {vision['patch_size']}, {vision['width']}")
    model, init = None, None
    if args.init is not None:
        if any(getattr(args, k) is not None for k in ("image_size", "patch_size", "width", "layers")):
            raise CliError("--init keeps the architecture of its weights: drop --image-size/--patch-size/--width/--layers")
        try:
            model, config, init = load_init(args.init)
        except (FileNotFoundError, ValueError) as exc:
            raise CliError(str(exc)) from None
    command = "excelseg " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    rec = train_clip(out, minutes=args.minutes, steps=args.steps, batch=args.batch_size, seed=args.seed,
                     threads=args.threads, log_every=args.log_every, eval_every=args.eval_every, lr=args.lr,
                     log_file=out.with_suffix(".log"), command=command, fp16=not args.fp32, config=config,
                     captions=args.captions, hard_negatives=args.hard_negatives, model=model, init=init,
                     schedule_steps=args.schedule_steps)
    print(f"wrote {out} and {out.with_suffix('.json')}: {rec['steps']} steps, {rec['seconds']:.0f}s, "
          f"loss {rec['final_loss']:.4f}, held-out zero-shot accuracy {rec['heldout_accuracy']}")
    return 0
