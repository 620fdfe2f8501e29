"""Convert a reference ExCEL checkpoint into an excelseg heads checkpoint (excelseg import-checkpoint).

Reads the authors' checkpoint (the DDP state dict a reference training run saves, e.g. model_iter_30000.pth, or a
.safetensors file with the same key names), keeps only the trainable heads (LVC adapter ``decoder_fts_fuse.*`` and
decoder ``decoder.*``), drops the frozen CLIP (``encoder.*``), checks every shape and refuses unknown or missing
keys with their list. The .pth file is opened with ``torch.load(weights_only=True)``: no code from it is run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, add_clip_arg, add_config_arg, add_vocabulary_arg, ranged

EXAMPLES = """examples:
  excelseg import-checkpoint checkpoints/model_iter_30000.pth --out voc_heads.safetensors
  excelseg import-checkpoint coco/model_iter_100000.pth --out coco_heads.safetensors --vocabulary coco
  excelseg import-checkpoint ref_heads_seed0.safetensors --out heads.safetensors --clip clip_rand_seed0.pt

Writes OUT: the heads' tensors (excelseg names, fp32) as safetensors, with in its metadata the class list
(--vocabulary; default voc for 20 classes, coco for 80), the identity of the CLIP the heads were trained with
(--clip; default ViT-B-16:openai, the reference's), the pipeline settings (--config; default voc or coco) and
the source file name and sha256. The frozen CLIP is never stored; it is loaded from its own weights when the
heads are used, and a checkpoint is refused with other CLIP weights or another class list."""


def register(sub) -> None:
    p = sub.add_parser("import-checkpoint", help="convert a reference ExCEL checkpoint to excelseg heads",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="reference checkpoint: .pth/.pt state dict (DDP 'module.' prefixes allowed) or "
                                ".safetensors")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-classes", type=ranged(int, 1, 100000), default=None,
                   help="expected foreground classes (20 VOC, 80 COCO); default: whatever the file has")
    add_vocabulary_arg(p, "the classes the heads were trained for: voc, coco, a comma list or a file "
                          "(default: voc for 20 classes, coco for 80)")
    add_clip_arg(p, "the CLIP the heads were trained with: a weight file (its sha256 is recorded) or an "
                    "open_clip tag (default ViT-B-16:openai, the reference's CLIP)")
    add_config_arg(p, "settings stored with the heads (default voc, or coco for 80 classes)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


REFERENCE_CLIP = "ViT-B-16:openai"  # what the reference trains with (EXCEL_SPEC §1)


def clip_identity(spec: str | None) -> str:
    """Identity of ``--clip`` without building the model where possible (a file: its sha256)."""
    import os

    from ..interop import source_sha256

    if spec is None:
        return REFERENCE_CLIP
    path = Path(spec).expanduser()
    if path.is_file():
        return f"sha256:{source_sha256(path)}"
    if os.sep in spec or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise CliError(f"--clip {spec}: no such file")
    from ..weights import load_clip

    return load_clip(spec, device="cpu").identity


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..interop import import_reference_heads, source_sha256
    from ..io.checkpoint import CheckpointError, save_checkpoint
    from ..vocab import Vocabulary

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {out}")
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; use --force to overwrite")
    if args.num_classes is not None and args.num_classes < 1:
        raise CliError(f"--num-classes must be >= 1, got {args.num_classes}")
    src = Path(args.file)
    try:
        state = import_reference_heads(src, args.num_classes)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    n_classes = int(state["decoder.classifier.weight"].shape[0]) - 1
    spec = args.vocabulary or {20: "voc", 80: "coco"}.get(n_classes)
    if spec is None:
        raise CliError(f"the heads predict {n_classes} classes: give their names with --vocabulary")
    vocab = Vocabulary.from_spec(spec)
    if vocab.num_classes != n_classes:
        raise CliError(f"--vocabulary has {vocab.num_classes} classes but the heads predict {n_classes}")
    try:
        cfg = load_config(args.config or ("coco" if spec == "coco" else "voc"))
    except (ConfigError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    identity = clip_identity(args.clip)
    named = spec.lower() if isinstance(spec, str) and spec.lower() in ("voc", "coco") else None
    save_checkpoint(out, state, class_names=vocab.names, clip_identity=identity, config=cfg,
                    metadata={"source": src.name, "source_sha256": source_sha256(src),
                              "source_format": "reference", **({"vocabulary": named} if named else {})})
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {n:,} parameters "
          f"({n_classes} classes: {', '.join(vocab.names[:3])}{', …' if n_classes > 3 else ''}; CLIP {identity})")
    return 0
