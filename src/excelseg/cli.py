"""The ``excelseg`` command. Each subcommand's ``--help`` is its manual; docs/ shows real invocations.

Building the parser imports only the standard library and the command modules' ``register`` functions, so
``excelseg --help`` and ``excelseg COMMAND --help`` answer without loading torch (``benchmarks/cli_help_time.py``).
Each command's ``run(args)`` imports what it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._version import __version__
from .commands.common import OVERRIDE_RE, CliError

COMMAND_ORDER = ("cam", "pseudo_label", "segment", "prepare", "bank", "describe", "train", "eval", "eval_cams",
                 "import_checkpoint", "demo", "app", "train_clip")
HELPER_MODULES = ("common", "run_folder")  # modules of excelseg.commands that are not subcommands


def command_modules() -> list[str]:
    """Module names of every subcommand in ``excelseg.commands`` (``register(subparsers)`` + ``run(args)``),
    in the order of the help listing."""
    import pkgutil

    from . import commands

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if m.name not in HELPER_MODULES
             and not m.name.startswith("_")]
    return sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n))


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other excelseg error (``--help`` shows the usage)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(
        prog="excelseg",
        description="ExCEL (CVPR 2025): pixel-level segmentation from image-level labels with CLIP. "
                    "Training-free CAMs and pseudo-labels for any images and class names.",
        epilog="Run 'excelseg COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"excelseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in command_modules():
        importlib.import_module(f"excelseg.commands.{name}").register(sub)
    return parser


def _legacy_argv(argv: list[str]) -> list[str]:
    """Old spellings that argparse cannot express as aliases, rewritten (with a warning) for one release."""
    from .commands.common import DATASET_KINDS, deprecated

    # excelseg prepare voc ROOT ...  ->  excelseg prepare --dataset voc --root ROOT ...
    for i, word in enumerate(argv):
        if word == "prepare":
            rest = argv[i + 1:]
            if len(rest) >= 2 and rest[0] in DATASET_KINDS and not rest[1].startswith("-"):
                deprecated(f"'prepare {rest[0]} ROOT'", f"'prepare --dataset {rest[0]} --root ROOT'")
                return [*argv[:i + 1], "--dataset", rest[0], "--root", rest[1], *rest[2:]]
            break
        if not word.startswith("-"):
            break
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some inputs failed, 2 usage or setup error)."""
    from .commands.common import WARNED

    WARNED.clear()
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(_legacy_argv(list(sys.argv[1:] if argv is None else argv)))
        # section.key=value words may stand anywhere for the commands that take settings (``overrides``)
        settings = [w for w in extra if OVERRIDE_RE.match(w)] if hasattr(args, "overrides") else []
        unknown = [w for w in extra if w not in settings]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if settings:
            args.overrides = [*args.overrides, *settings]
    except SystemExit as exc:  # --help, --version (0) and usage errors (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 2
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
