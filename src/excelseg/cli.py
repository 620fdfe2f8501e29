"""The ``excelseg`` command. Each subcommand's ``--help`` is its manual; the README shows real invocations."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from . import __version__

_logger = logging.getLogger("excelseg")


COMMAND_ORDER = ("cam", "pseudo_label", "prepare", "bank", "describe", "train", "eval", "eval_cams", "segment",
                 "demo")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 16:
        raise argparse.ArgumentTypeError(f"size must be N or HxW with sides >= 16, got {text!r}")
    return vals[0], vals[1]


def _scales(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be a comma list of numbers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the training-free pipeline."""
    g = p.add_argument_group("model")
    g.add_argument("--clip", default=None,
                   help="CLIP weights: open_clip tag (default ViT-B-16, OpenAI weights), a weight file "
                        "(.pt TorchScript or state dict, .pth, .bin, .safetensors) or hf-hub:ORG/NAME; "
                        "default $EXCELSEG_CLIP, then ViT-B-16")
    g.add_argument("--bank", default=None,
                   help="TSE attribute bank (.pth reference format, .safetensors, .npz) enriching every class; "
                        "default: plain prompts")
    g.add_argument("--knowledge", default=None,
                   help="knowledge base instead of a bank (voc, coco or a JSON file): its attribute bank is built "
                        "once and cached; classes it does not describe keep plain prompts (with a warning)")
    g.add_argument("--clusters", default=None,
                   help="attribute clusters B for --knowledge: N or auto (default 112 voc, 224 coco, else auto)")
    g.add_argument("--preset", default="paper", choices=["paper", "paper-voc", "paper-coco"],
                   help="settings preset (default: paper = the reference's VOC values)")
    g.add_argument("--size", type=_size, default=None, help="network input N or HxW (paper: 320)")
    g.add_argument("--scales", type=_scales, default=None, help="CAM scales, e.g. 1,0.75,1.25 (paper: 1)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also average horizontally flipped CAMs (paper: off)")
    g.add_argument("--box-threshold", type=float, default=None, help="τ_box of the box mask (paper: 0.79)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--batch-size", type=int, default=1, help="images per backbone forward (default 1)")


def clusters_arg(text: str | None) -> int | str | None:
    """``--clusters``: None, ``auto`` or a positive integer."""
    if text is None or text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"--clusters must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise CliError(f"--clusters must be a positive integer or 'auto', got {text!r}")
    return value


def config_from_args(args: argparse.Namespace):
    from .config import PRESETS

    cfg = PRESETS[args.preset]
    cam = cfg.cam
    if args.size is not None:
        cam = replace(cam, size=args.size)
    if args.scales is not None:
        cam = replace(cam, scales=args.scales)
    if args.flip is not None:
        cam = replace(cam, flip=args.flip)
    ref = cfg.refine
    if args.box_threshold is not None:
        if not 0.0 <= args.box_threshold <= 1.0:
            raise CliError(f"--box-threshold must be in [0, 1], got {args.box_threshold}")
        ref = replace(ref, box_threshold=args.box_threshold)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    return cfg.with_(cam=cam, refine=ref)


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import pkgutil

    from . import commands

    parser = argparse.ArgumentParser(
        prog="excelseg",
        description="ExCEL (CVPR 2025): pixel-level segmentation from image-level labels with CLIP. "
                    "Training-free CAMs and pseudo-labels for any images and class names.",
        epilog="Run 'excelseg COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"excelseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # every module of excelseg.commands is a subcommand (``register(subparsers)``), listed in COMMAND_ORDER first
    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    for name in sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n)):
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some inputs failed, 2 usage or setup error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"excelseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, PermissionError) as exc:
        if args.verbose >= 2:
            raise
        print(f"excelseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
