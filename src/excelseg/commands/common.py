"""What every subcommand shares: one error type, one vocabulary of options, one place for defaults.

Loaded whenever the ``excelseg`` parser is built, so it imports only the standard library at module level
(``excelseg --help`` must not import torch). Commands import from here and from :mod:`.run_folder` (where
outputs go), never from each other.

Option vocabulary (one meaning each, in every command):

``--out``          a FILE the command writes (bank, knowledge base, metrics JSON, index, weights)
``--out-dir``      a FOLDER of per-image outputs (cam, pseudo-label, demo)
``--dataset/--root/--index/--split``   a dataset prepared by ``excelseg prepare``
``--workers``      worker processes (0 = in the main process), default :func:`default_workers`
``--batch-size``   items per forward pass
``--device``       cpu, cuda, cuda:N or auto
``--config``       pipeline settings: a shipped name (voc, coco, synthetic) or a YAML file; positional
                   ``section.key=value`` words override single settings (``cam.flip=true``)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..config import ATTENTION_MODES  # standard library only (the settings' dataclasses)

DATASET_KINDS = ("voc", "coco", "folder")
OVERRIDE_RE = re.compile(r"^(text|cam|refine|heads|segment|train)\.[a-z_]+=")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---- defaults (decided here only) --------------------------------------------------------------------------


def default_workers() -> int:
    """Worker processes for file-bound work: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def default_split(kind: str, purpose: str) -> str:
    """The split a dataset command uses without ``--split``.

    ``purpose``: ``"pseudo-label"`` / ``"eval-cams"`` (the paper scores CAM seeds and makes pseudo-labels on
    train) or ``"eval"`` (predictions are scored on val). Folder datasets have one split, ``all``; the generated
    scenes (``synthetic``) default to their 100 held-out ``val`` scenes for every purpose."""
    if kind == "folder":
        return "all"
    if kind == "synthetic":
        return "val"
    return "val" if purpose == "eval" else "train"


# ---- argument types -------------------------------------------------------------------------------------------


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {n}")
        return n

    return parse


workers_arg = _int_at_least(0, "--workers")
batch_size_arg = _int_at_least(1, "--batch-size")


def ranged(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: a ``kind`` (int or float) within the bounds (as :class:`excelseg.config.Range`); a value
    outside is a usage error naming the valid range (argparse adds the option's name)."""
    from ..config import Range

    valid = Range(low, high, low_open, high_open)
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
        if value not in valid:
            how = "lie in" if low is not None and high is not None else "be"
            raise argparse.ArgumentTypeError(f"must {how} {valid.text}, got {text}")
        return value

    return parse


def setting_arg(key: str, parse=float):
    """An argparse type for a flag that sets ``section.key`` (``--box-threshold`` = ``refine.box_threshold``):
    ``parse(text)`` checked against the setting's range (:func:`excelseg.config.check_setting`)."""

    def check(text: str):
        from ..config import ConfigError, check_setting

        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            return check_setting(*key.split("."), value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def size_arg(text: str) -> tuple[int, int]:
    """``N`` or ``HxW`` (also ``H,W``), sides ≥ 16."""
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


def scales_arg(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be a comma list of numbers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return vals


def clusters_arg(text: str | None) -> int | str | None:
    """``--clusters``: None, ``auto`` or a positive integer (argparse type and plain parser)."""
    if text is None or text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clusters must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--clusters must be a positive integer or 'auto', got {text!r}")
    return value


# ---- deprecated spellings -------------------------------------------------------------------------------------


def deprecated(old: str, new: str) -> None:
    """Warn once on stderr that ``old`` is deprecated (kept for one release) in favour of ``new``."""
    message = f"{old} is deprecated and will be removed in the next release; use {new}"
    if message in WARNED:  # e.g. --preset, read by each resolution of the settings
        return
    WARNED.add(message)
    print(f"warning: {message}", file=sys.stderr)  # only this line: a FutureWarning as well would say it twice


WARNED: set[str] = set()  # deprecation messages printed by this command (excelseg.cli.main clears it)


class DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new option's ``dest`` and warns (``new`` names the new one)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(option_string, self.new)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_out_dir(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """``--out-dir`` (a folder of per-image outputs) and its deprecated spelling ``--out``. Without a default the
    command must call :func:`out_dir_arg` (argparse's ``required`` would refuse the old spelling)."""
    shown = f" (default: {default})" if default is not None else " (required)"
    p.add_argument("--out-dir", dest="out_dir", default=default, metavar="DIR", help=f"{what}{shown}")
    p.add_argument("--out", dest="out_dir", action=DeprecatedAlias, new="--out-dir", help=argparse.SUPPRESS)


def add_job_args(p: Any) -> None:
    """Options of the per-image batch commands (cam, segment, pseudo-label): resume and I/O overlap."""
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--no-overlap", action="store_true",
                   help="decode and write in the main thread (default: the next batch is decoded and the outputs "
                        "written in background threads while the forward runs)")


def out_dir_arg(args: argparse.Namespace) -> Path:
    if args.out_dir is None:
        raise CliError("give --out-dir DIR (the folder for the outputs)")
    return Path(args.out_dir).expanduser()


# ---- shared option groups -------------------------------------------------------------------------------------


CLIP_HELP = ("CLIP weights: open_clip tag (default ViT-B-16, OpenAI weights), a weight file (.pt TorchScript or "
             "state dict, .pth, .bin, .safetensors), hf-hub:ORG/NAME or 'synthetic' (shipped); default "
             "$EXCELSEG_CLIP, then ViT-B-16")
CONFIG_HELP = ("pipeline settings: voc (the paper's, default), coco, synthetic or a YAML file; section.key=value "
               "words override single settings (see 'Settings' in docs/cli-and-weights.md)")


def add_clip_arg(p: Any, help: str = CLIP_HELP) -> None:
    """``--clip SPEC``: the CLIP weights (resolved by :func:`excelseg.weights.load_clip`)."""
    p.add_argument("--clip", default=None, metavar="SPEC", help=help)


def add_config_arg(p: Any, help: str = CONFIG_HELP) -> None:
    """``--config NAME|YAML``: pipeline settings (:func:`config_from_args`)."""
    p.add_argument("--config", default=None, metavar="NAME|YAML", help=help)


def add_vocabulary_arg(p: Any, help: str) -> None:
    """``--vocabulary``: voc, coco, a comma list or a file (:meth:`excelseg.vocab.Vocabulary.from_spec`)."""
    p.add_argument("--vocabulary", default=None, help=help)


def add_view_args(g: Any, section: str, *, size: str, scales: str, flip: str) -> None:
    """``--size`` (= ``cam.size``), ``--scales`` and ``--flip`` (= ``<section>.scales`` / ``<section>.flip``: the
    CAM views for ``cam``, the segmentation views for ``segment``), with these help texts."""
    g.add_argument("--size", type=setting_arg("cam.size", size_arg), default=None, help=size)
    g.add_argument("--scales", type=setting_arg(f"{section}.scales", scales_arg), default=None, help=scales)
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help=flip)


def add_model_args(p: argparse.ArgumentParser, *, batch_default: int = 1, checkpoint: bool = False) -> None:
    """Options of every command that runs the training-free pipeline; ``checkpoint``: also ``--checkpoint``
    (trained heads for LVC CAMs / pseudo-labels: cam, pseudo-label)."""
    g = p.add_argument_group("model")
    add_clip_arg(g)
    g.add_argument("--bank", default=None,
                   help="TSE attribute bank (.pth reference format, .safetensors, .npz) enriching every class; "
                        "default: plain prompts")
    g.add_argument("--knowledge", default=None,
                   help="knowledge base instead of a bank (voc, coco or a JSON file): its attribute bank is built "
                        "once and cached; classes it does not describe keep plain prompts (with a warning)")
    g.add_argument("--clusters", type=clusters_arg, default=None,
                   help="attribute clusters B for --knowledge: N or auto (default 112 voc, 224 coco, else auto)")
    add_config_arg(g)
    g.add_argument("--preset", default=None, choices=["paper", "paper-voc", "paper-coco"], help=argparse.SUPPRESS)
    add_view_args(g, "cam", size="network input N or HxW (= cam.size; paper: 320)",
                  scales="CAM scales, e.g. 1,0.75,1.25 (= cam.scales; paper: 1)",
                  flip="also average horizontally flipped CAMs (= cam.flip; paper: off)")
    g.add_argument("--box-threshold", type=setting_arg("refine.box_threshold"), default=None,
                   help="τ_box of the box mask (= refine.box_threshold; paper: 0.79)")
    add_attention_arg(g)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="CLIP forward precision (autocast): fp32 (default, parity), bf16 (CUDA or CPU), fp16 (CUDA)")
    g.add_argument("--batch-size", type=batch_size_arg, default=batch_default,
                   help=f"images per backbone forward (default {batch_default})")
    if checkpoint:
        g.add_argument("--checkpoint", default=None, metavar="CKPT",
                       help="trained heads (excelseg .safetensors checkpoint): LVC CAMs with flip and P-guided "
                            "refinement, the reference's infer_lam --training_free false; default: training-free. "
                            "Its settings and class list are the defaults")
    p.set_defaults(overrides=[])  # section.key=value words, collected by excelseg.cli.main


ATTENTION_HELP = ("last-block attention of the dense forward (= cam.attention): svc (ExCEL's calibration, the "
                  "paper's, default), maskclip, sclip, clearclip, naclip (those methods' own, with their own input "
                  "preprocessing unless cam.attention_input=pipeline) or none (plain CLIP); refinement, TSE and "
                  "box masks run unchanged on top (docs/attention-modes.md)")


def add_attention_arg(p: Any, help: str = ATTENTION_HELP) -> None:
    """``--attention MODE`` (:data:`excelseg.config.ATTENTION_MODES`)."""
    p.add_argument("--attention", default=None, choices=ATTENTION_MODES, metavar="MODE",
                   help=help + f"; one of {', '.join(ATTENTION_MODES)}")


def add_dataset_args(p: argparse.ArgumentParser, purpose: str, *, workers_help: str = "processes reading files",
                     allow_missing: bool = False, extra_kinds: tuple[str, ...] = (), default_kind: str | None = "voc",
                     kind_help: str = "dataset kind (default voc; synthetic: the generated scenes, no --root)"
                     ) -> argparse._ArgumentGroup:
    """``--dataset --root --index --split --workers`` (default split: :func:`default_split`); with
    ``allow_missing`` also ``--allow-missing`` (scoring commands); ``extra_kinds``: more ``--dataset`` choices."""
    g = p.add_argument_group("dataset")
    kinds = tuple(dict.fromkeys((*DATASET_KINDS, "synthetic", *extra_kinds)))  # synthetic: generated scenes
    g.add_argument("--dataset", choices=kinds, default=default_kind, help=kind_help)
    g.add_argument("--root", default=None,
                   help="dataset root as given to 'excelseg prepare' (finds <ROOT>/excelseg_index.json)")
    g.add_argument("--index", default=None, help="index JSON written by 'excelseg prepare' (instead of --root)")
    shown = default_split("voc", purpose), default_split("folder", purpose)
    g.add_argument("--split", default=None, help=f"split (default {shown[0]} for voc/coco, {shown[1]} for folder)")
    nw = default_workers()
    g.add_argument("--workers", type=workers_arg, default=nw, help=f"{workers_help} (default {nw}; 0 = none)")
    if allow_missing:
        g.add_argument("--allow-missing", action="store_true",
                       help="skip images without an input file (reported) instead of failing")
    return g


def open_dataset_args(args: argparse.Namespace, purpose: str, *, need_masks: bool = False, **kw):
    """The dataset of ``--dataset/--root/--index/--split``, with one-line errors."""
    from ..data import open_dataset

    if args.dataset != "synthetic" and args.root is None and args.index is None:
        raise CliError("give --root (the prepared dataset) or --index")
    split = args.split or default_split(args.dataset, purpose)
    ds = open_dataset(args.dataset, root=args.root, split=split, index=args.index, **kw)
    if need_masks and not ds.has_masks:
        raise CliError(f"split {ds.split!r} of {ds.kind} has no ground-truth masks to score against")
    if not ds.ids:
        raise CliError(f"split {ds.split!r} of {ds.kind} is empty")
    return ds


# ---- pipeline settings ----------------------------------------------------------------------------------------


def split_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``section.key=value`` words from other positional words (image paths)."""
    return [w for w in words if not OVERRIDE_RE.match(w)], [w for w in words if OVERRIDE_RE.match(w)]


def load_checkpoint_arg(args: argparse.Namespace):
    """The ``--checkpoint`` file as a HeadsCheckpoint (None without one), or a one-line CliError."""
    if getattr(args, "checkpoint", None) is None:
        return None
    from ..io.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(args.checkpoint)
    except (CheckpointError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the checkpoint {args.checkpoint} ({exc.strerror or exc})") from None


def clip_spec_arg(args: argparse.Namespace, ckpt: Any = None) -> str | None:
    """``--clip``; without it and with a checkpoint, the CLIP the checkpoint was made with (the shipped
    ``synthetic`` one by name, an open_clip tag as recorded); ``None``: the default resolution
    ($EXCELSEG_CLIP, then ViT-B-16)."""
    if getattr(args, "clip", None) is not None or ckpt is None:
        return getattr(args, "clip", None)
    from ..io.checkpoint import clip_spec_of

    spec = clip_spec_of(ckpt.clip_identity)
    if spec is None and not os.environ.get("EXCELSEG_CLIP", "").strip():
        raise CliError(f"{args.checkpoint} was made with the CLIP weight file {ckpt.clip_identity}; give that file "
                       "with --clip")
    return spec


def warn_unknown_classes(clip: Any, names: Any) -> None:
    """On the shipped synthetic CLIP, warn (stderr) about class names it was never taught: their masks are
    meaningless (what the web page says on that CLIP)."""
    from ..io.checkpoint import named_clips

    if named_clips().get(clip.identity) != "synthetic" or names is None:
        return
    from ..synthetic import CLASS_NAMES
    from ..vocab import normalize_name

    known = {normalize_name(n) for n in CLASS_NAMES}
    unknown = [n for n in names if normalize_name(n) not in known]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        print(f"warning: the shipped synthetic CLIP only knows its {len(CLASS_NAMES)} synthetic shapes (e.g. "
              f"{CLASS_NAMES[0]!r}, {CLASS_NAMES[1]!r}); {shown} {'is' if len(unknown) == 1 else 'are'} not among "
              "them, so their masks are meaningless: for real images use real CLIP weights (--clip ViT-B-16 or a "
              "weight file)", file=sys.stderr)


CAM_FLAGS = (("size", "cam.size"), ("scales", "cam.scales"), ("flip", "cam.flip"),
             ("box_threshold", "refine.box_threshold"), ("attention", "cam.attention"))
SEGMENT_FLAGS = (("size", "cam.size"), ("scales", "segment.scales"), ("flip", "segment.flip"),
                 ("crf", "segment.crf"))


def config_from_args(args: argparse.Namespace, clip: Any = None, overrides: list[str] | None = None,
                     base: Any = None, flags: tuple = CAM_FLAGS):
    """The pipeline configuration of a command, resolved in one order:
    ``--config`` (or the deprecated ``--preset``; default: ``base`` (a checkpoint's settings), else the
    weights' own settings, else voc) →
    ``section.key=value`` overrides → the dedicated flags, ``(attribute, section.key)`` pairs (default
    :data:`CAM_FLAGS`: --size, --scales, --flip, --box-threshold, --attention; ``segment``: :data:`SEGMENT_FLAGS`)."""
    from ..config import ConfigError, apply_overrides, load_config

    spec = args.config
    if getattr(args, "preset", None):
        deprecated("--preset", "--config voc|coco")
        spec = spec or {"paper": "voc", "paper-voc": "voc", "paper-coco": "coco"}[args.preset]
    if spec is None:
        spec = base if base is not None else getattr(clip, "default_config", None) or "voc"
    pairs = list(overrides or [])
    for flag, key in flags:
        value = getattr(args, flag, None)
        if value is not None:
            pairs.append((key, value))
    try:
        return apply_overrides(load_config(spec), pairs)
    except (ConfigError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None


# ---- running the pipeline -------------------------------------------------------------------------------------


def cam_predictor(args: argparse.Namespace, clip: Any, vocab: Any, cfg: Any, device: Any, checkpoint: Any = None):
    """The ``CamPredictor`` of the model options (``--bank``, ``--knowledge``, ``--clusters``, ``--precision``);
    a checkpoint that does not fit is a one-line CliError."""
    from ..io.checkpoint import CheckpointError
    from ..predictor import CamPredictor

    try:
        return CamPredictor(clip, vocabulary=vocab, bank=args.bank, knowledge=args.knowledge, clusters=args.clusters,
                            config=cfg, device=device, checkpoint=checkpoint, precision=args.precision)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None


def progress(desc: str | None = None, unit: str = "img"):
    """``wrap(iterable, total, desc)`` with a tqdm bar (silent when stderr is not a terminal)."""
    from tqdm import tqdm

    return lambda it, total, d: tqdm(it, total=total, desc=desc or d, unit=unit, disable=None)
