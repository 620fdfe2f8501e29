"""The plain ViT forward: open_clip's blocks vs excelseg's dense encoder, interleaved, per input size.

    python benchmarks/dense_forward.py [--sizes 224,320,448,480] [--batch 2] [--rounds 5] [--threads 1]
    python benchmarks/dense_forward.py --memory 1024

Both sides run the same random ViT-B/16 (QuickGELU) on the same (batch, 3, size, size) input without SVC:
(a) open_clip's ``encode_image`` (its blocks call ``nn.MultiheadAttention``), (b)
:class:`excelseg.backbone.DenseEncoder` keeping every block's tokens, as the segmentation heads read them (each
block's attention through ``F.scaled_dot_product_attention``). After one warm-up call of each, (a) and (b) alternate
for ``--rounds`` rounds; every round gives one ratio a/b (> 1: the dense encoder is faster). Prints per size the
median ms per call of each side, the ratio's median and spread (min–max), and the largest difference between the two
sides' final CLS embeddings relative to their magnitude (the same network: float rounding only).

``--memory SIZE``: each side's peak memory on one SIZE × SIZE image (plain features only), each in a fresh process:
the growth of the peak resident set over the forward.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import open_clip
import torch

from excelseg.backbone import DenseEncoder


def peak_growth_mb(side: str, size: int) -> float:
    """Run one forward of ``side`` ("a" or "b") on a fresh model in this process; peak RSS growth in MB."""
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True, force_image_size=size).eval()
    model.requires_grad_(False)
    x = torch.randn(1, 3, size, size)
    encoder = DenseEncoder(model.visual)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model.encode_image(x) if side == "a" else encoder(x, return_tokens=False)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="224,320,448,480")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave default)")
    ap.add_argument("--memory", type=int, metavar="SIZE", help="peak memory of each side at SIZE, fresh processes")
    ap.add_argument("--side", choices=("a", "b"), help=argparse.SUPPRESS)  # --memory's child process
    args = ap.parse_args()
    if args.memory and args.side:
        print(f"{peak_growth_mb(args.side, args.memory):.0f}")
        return
    if args.memory:
        for side, name in (("a", "open_clip encode_image"), ("b", "dense encoder")):
            out = subprocess.run([sys.executable, __file__, "--memory", str(args.memory), "--side", side],
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
            print(f"size {args.memory}: ({side}) {name}: peak memory +{out} MB")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} interleaved rounds")
    for size in (int(s) for s in args.sizes.split(",")):
        model = open_clip.create_model("ViT-B-16", force_quick_gelu=True, force_image_size=size).eval()
        model.requires_grad_(False)
        encoder = DenseEncoder(model.visual)
        x = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            theirs, ours = model.encode_image(x), encoder(x).pooled
        err = float((theirs - ours).abs().max() / theirs.abs().max())
        times: dict[str, list[float]] = {"a": [], "b": []}
        with torch.no_grad():
            for _ in range(args.rounds):
                for side, call in (("a", model.encode_image), ("b", encoder)):
                    t0 = time.perf_counter()
                    call(x)
                    times[side].append(time.perf_counter() - t0)
        ratios = [a / b for a, b in zip(times["a"], times["b"])]
        print(f"size {size} ({(size // 16) ** 2 + 1} tokens): (a) open_clip {1000 * statistics.median(times['a']):7.0f} ms"
              f"   (b) dense encoder {1000 * statistics.median(times['b']):7.0f} ms   a/b "
              f"{statistics.median(ratios):.2f} (spread {min(ratios):.2f}-{max(ratios):.2f})   "
              f"max |Δ pooled| / max |pooled| {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
