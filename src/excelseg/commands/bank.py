"""Build, import and inspect TSE attribute banks (excelseg bank).

An attribute bank holds B cluster centres of CLIP text embeddings of class descriptions (Text Semantic
Enrichment, paper §3.2); 'excelseg cam --bank FILE' uses it to enrich the class prompts. 'build' encodes a
knowledge base with the CLIP you will use it with and clusters it with K-means; 'import' converts the
reference implementation's .pth (or a .npz) into excelseg's .safetensors; 'info' shows what a bank holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from .common import (
    CliError,
    add_clip_arg,
    add_config_arg,
    batch_size_arg,
    clusters_arg,
    config_from_args,
    ranged,
)

EXAMPLES = """examples:
  excelseg bank build --knowledge voc --clusters 112 --out voc_bank.safetensors
  excelseg bank build --knowledge coco --clusters 224 --clip ~/weights/ViT-B-16.pt --out coco_bank.safetensors
  excelseg bank build --knowledge my_classes.json --clusters auto --no-prefix --out my_bank.safetensors
  excelseg bank import reference_voc_bank_112.pth --out voc_ref.safetensors --classes voc
  excelseg bank info voc_bank.safetensors

--knowledge takes voc, coco (the shipped knowledge bases) or a JSON file: excelseg's format
{"format": "excelseg-knowledge/1", "classes": {"cat": {"descriptions": [...]}}} or the reference's
{"cat": ["sentence", ...]}. Build the bank with the same CLIP you run 'excelseg cam' with: banks record the
CLIP's identity and a mismatch is refused. The paper uses B = 112 (VOC) and 224 (COCO), the defaults for
voc and coco."""

def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("bank", help="build, import and inspect TSE attribute banks", description=__doc__,
                       epilog=EXAMPLES, formatter_class=fmt)
    actions = p.add_subparsers(dest="bank_command", metavar="ACTION")
    actions.required = True

    b = actions.add_parser("build", help="encode a knowledge base with CLIP and cluster it into a bank",
                           description="Encode every description of a knowledge base with the CLIP text "
                                       "tower and cluster the embeddings into B attributes (K-means).",
                           epilog=EXAMPLES, formatter_class=fmt)
    b.add_argument("--knowledge", required=True, help="voc, coco or a knowledge JSON file")
    b.add_argument("--clusters", type=clusters_arg, default=None,
                   help="number of attributes B, or 'auto' (chosen by silhouette score); "
                        "default: the paper's 112 for voc, 224 for coco")
    b.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    add_clip_arg(b)
    b.add_argument("--seed", type=ranged(int, 0, 2**32 - 1), default=0, help="K-means seed (default 0)")
    add_config_arg(b, "pipeline settings whose text.template prefixes every description (default: those the "
                      "CLIP was made for, else voc: the paper's 'a clean origami {}.')")
    b.add_argument("--template", default=None,
                   help="prefix put before every description, with the class name at {} (overrides --config)")
    b.add_argument("--no-prefix", action="store_true",
                   help="encode the descriptions alone (clusters may then mix classes)")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    b.add_argument("--batch-size", type=batch_size_arg, default=256,
                   help="sentences per text forward (default 256)")
    b.set_defaults(func=run_build)

    i = actions.add_parser("import", help="convert a reference .pth (or .npz) bank to .safetensors",
                           description="Convert the reference implementation's bank (a .pth list "
                                       "[centres E×B, flags C×B]) or a .npz ('centres' E×B or "
                                       "'attributes' B×E, optional 'flags') into excelseg's .safetensors.",
                           epilog=EXAMPLES, formatter_class=fmt)
    i.add_argument("source", help="bank file: .pth, .pt, .npz (or .safetensors)")
    i.add_argument("--out", required=True, help="output .safetensors file")
    i.add_argument("--classes", default=None,
                   help="record the class names of the flag rows: voc, coco or a comma list (optional)")
    i.set_defaults(func=run_import)

    n = actions.add_parser("info", help="show the shape, metadata and clusters per class of a bank",
                           description="Show what a bank file (.safetensors, .pth, .npz) holds.",
                           epilog=EXAMPLES, formatter_class=fmt)
    n.add_argument("file", help="bank file")
    n.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from ..bank import PAPER_CLUSTERS, build_bank, knowledge_digest, save_bank, validate_build
    from ..devices import resolve_device
    from ..knowledge import load_knowledge
    from ..weights import load_clip

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"--out must be a .safetensors file, got {args.out!r}")
    if args.no_prefix and args.template is not None:
        raise CliError("--template and --no-prefix exclude each other")
    if args.template is not None and "{}" not in args.template:
        raise CliError(f"--template {args.template!r} must contain '{{}}' where the class name goes")
    config_from_args(args)  # a bad --config fails before the CLIP load
    clusters = args.clusters
    if clusters is None:
        key = args.knowledge.lower()
        if key not in PAPER_CLUSTERS or Path(args.knowledge).is_file():
            raise CliError("give --clusters N or --clusters auto (the paper's B is known only for voc and "
                           "coco)")
        clusters = PAPER_CLUSTERS[key]
    knowledge = load_knowledge(args.knowledge)
    n = validate_build(knowledge, clusters)  # before the (slow) CLIP load
    t0 = time.perf_counter()
    clip = load_clip(args.clip, device=resolve_device(args.device))
    t_load = time.perf_counter() - t0
    template = args.template if args.template is not None else config_from_args(args, clip).text.template
    prefix = None if args.no_prefix else template
    how = f"prefix {prefix!r}" if prefix is not None else "no prefix"
    print(f"{n} descriptions of {len(knowledge)} classes from {args.knowledge}; CLIP {clip.name} "
          f"({clip.identity[:19]}); {how}")
    timings: dict[str, float] = {}
    bank = build_bank(clip, knowledge, clusters, seed=args.seed, prefix=prefix, batch_size=args.batch_size,
                      knowledge_sha256=knowledge_digest(knowledge), timings=timings)
    save_bank(bank, out)
    b = bank.num_attributes
    if clusters == "auto":
        scores = json.loads(bank.meta["auto_scores"])
        print("silhouette per B: " + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()))
        print(f"B = {b} (chosen by silhouette among {len(scores)} candidates)")
    else:
        print(f"B = {b}")
    print(f"times: load CLIP {t_load:.1f} s, encode {timings['encode_s']:.1f} s, "
          f"cluster {timings['cluster_s']:.1f} s")
    print(f"wrote {out} ({b} attributes x {bank.attributes.shape[1]} dims, flags {len(knowledge)} x {b})")
    return 0


def _class_names(spec: str, rows: int) -> list[str]:
    from ..vocab import COCO_CLASSES, VOC_CLASSES, parse_class_list

    names = {"voc": list(VOC_CLASSES), "coco": list(COCO_CLASSES)}.get(spec.lower()) or parse_class_list(spec)
    if len(names) != rows:
        raise CliError(f"--classes names {len(names)} classes but the bank's flags have {rows} rows")
    return names


def run_import(args: argparse.Namespace) -> int:
    from ..bank import BANK_FORMAT, AttributeBank, save_bank

    src, out = Path(args.source), Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"--out must be a .safetensors file, got {args.out!r}")
    if out.resolve() == src.resolve():
        raise CliError("--out must differ from the source file")
    bank = AttributeBank.load(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    meta = {k: v for k, v in bank.meta.items()}
    meta.update({"format": BANK_FORMAT, "clusters": str(bank.num_attributes),
                 "embed_dim": str(bank.attributes.shape[1]), "imported_from": src.name,
                 "source_sha256": digest})
    meta.setdefault("clip_identity", "")
    if args.classes is not None:
        if bank.flags is None:
            raise CliError(f"{src} has no flags, so --classes has nothing to name")
        meta["classes"] = json.dumps(_class_names(args.classes, bank.flags.shape[0]), ensure_ascii=False)
    bank.meta = meta
    save_bank(bank, out)
    flags = "none" if bank.flags is None else f"{bank.flags.shape[0]} x {bank.flags.shape[1]}"
    print(f"read {src}: {bank.num_attributes} attributes x {bank.attributes.shape[1]} dims, flags {flags}")
    if not meta["clip_identity"]:
        print("clip_identity: empty — the source does not record which CLIP built it (the reference used "
              "OpenAI ViT-B/16); excelseg accepts it with any CLIP of the same embedding dimension")
    print(f"wrote {out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..bank import AttributeBank

    bank = AttributeBank.load(args.file)
    a = bank.attributes
    norms = a.norm(dim=1)
    print(f"file: {args.file}")
    print(f"format: {bank.meta.get('format', 'reference list / plain arrays (no metadata)')}")
    print(f"attributes: {a.shape[0]} x {a.shape[1]} float32 (norms {norms.min():.3f} / {norms.mean():.3f} / "
          f"{norms.max():.3f} min / mean / max)")
    for key in sorted(bank.meta):
        value = bank.meta[key]
        if key in ("classes", "auto_scores"):
            continue
        print(f"{key}: {value if value != '' else '(empty)'}")
    if "auto_scores" in bank.meta:
        scores = json.loads(bank.meta["auto_scores"])
        print("auto_scores (silhouette per B): " + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()))
    if bank.flags is None:
        print("flags: none")
        return 0
    f = bank.flags > 0.5
    names = None
    if "classes" in bank.meta:
        try:
            names = json.loads(bank.meta["classes"])
        except ValueError:
            names = None
    if not isinstance(names, list) or len(names) != f.shape[0]:
        names = [f"class {c}" for c in range(f.shape[0])]
        print("class names: not recorded (add them with 'excelseg bank import FILE --out OUT --classes ...')")
    per_class = f.sum(1).tolist()
    shared = int((f.sum(0) > 1).sum())
    empty = int((f.sum(0) == 0).sum())
    print(f"flags: {f.shape[0]} classes x {f.shape[1]} clusters; {shared} clusters shared by several "
          f"classes, {empty} with no class")
    print("clusters per class: " + ", ".join(f"{n} {int(k)}" for n, k in zip(names, per_class)))
    return 0
