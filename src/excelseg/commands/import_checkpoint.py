"""Convert a reference ExCEL checkpoint into an excelseg heads checkpoint (excelseg import-checkpoint).

Reads the authors' checkpoint (the DDP state dict a reference training run saves, e.g. model_iter_30000.pth, or a
.safetensors file with the same key names), keeps only the trainable heads (LVC adapter ``decoder_fts_fuse.*`` and
decoder ``decoder.*``), drops the frozen CLIP (``encoder.*``), checks every shape and refuses unknown or missing
keys with their list. The .pth file is opened with ``torch.load(weights_only=True)``: no code from it is run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError

EXAMPLES = """examples:
  excelseg import-checkpoint checkpoints/model_iter_30000.pth --out voc_heads.safetensors
  excelseg import-checkpoint ref_heads_seed0.safetensors --out heads.safetensors --num-classes 20

Writes OUT: the heads' tensors (excelseg names, fp32) as safetensors, with the source file name and sha256 in
its metadata. The frozen CLIP is never stored; it is loaded from its own weights (--clip) when the heads are used."""


def register(sub) -> None:
    p = sub.add_parser("import-checkpoint", help="convert a reference ExCEL checkpoint to excelseg heads",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="reference checkpoint: .pth/.pt state dict (DDP 'module.' prefixes allowed) or "
                                ".safetensors")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-classes", type=int, default=None,
                   help="expected foreground classes (20 VOC, 80 COCO); default: whatever the file has")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop import CheckpointError, import_reference_heads, save_heads, source_sha256

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
    save_heads(out, state, {"source": src.name, "source_sha256": source_sha256(src),
                            "source_format": "reference"})
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {n:,} parameters "
          f"({int(state['decoder.classifier.weight'].shape[0]) - 1} classes)")
    return 0
