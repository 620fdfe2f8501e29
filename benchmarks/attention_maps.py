"""The attention maps of the training-free forward on the CPU: the native fused kernels vs torch ops, interleaved.

    python benchmarks/attention_maps.py [--sizes 224,320,448] [--rounds 15] [--threads 2]
    python benchmarks/attention_maps.py --forward [--sizes 320] [--rounds 8] [--batch 1]

Kernels (default): per input size (T = (size/16)² + 1 tokens, ViT-B/16's 12 heads of 64), one image's
(a) SVC map (``intra_correlation``: Σ over heads and q, k, v of softmax(s z zᵀ), paper §3.3) and (b) the attention
with its head-mean map (the refinement layers' attention), each by torch ops and by the native kernels
(``excelseg/_native/attention.c``), and for scale the fused ``F.scaled_dot_product_attention`` (output only, no
map). Every round runs each variant once, in turn; prints the median ms per call and, per round, the ratio
torch / native (> 1: native faster) as median and spread (min–max), plus the largest difference to torch relative
to the map's magnitude.

``--forward``: the whole calibrated dense forward of the training-free path (SVC on the last 5 blocks, attention
maps of the last 6) with the native kernels vs with torch ops (``EXCELSEG_NATIVE=0`` on that side),
and a bare open_clip ``encode_image`` at the same size, interleaved per round; ratios per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import open_clip
import torch

from excelseg import _native as native
from excelseg.backbone import DenseEncoder
from excelseg.calibration import intra_correlation


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (spread {min(values):.2f}-{max(values):.2f})"


class TorchOnly:
    """Within the block ``EXCELSEG_NATIVE=0``: the dispatch finds no native kernels and torch ops run."""

    def __enter__(self):
        self.saved = os.environ.get(native.ENV_NATIVE)
        os.environ[native.ENV_NATIVE] = "0"

    def __exit__(self, *exc):
        if self.saved is None:
            del os.environ[native.ENV_NATIVE]
        else:
            os.environ[native.ENV_NATIVE] = self.saved


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def kernels(size: int, rounds: int) -> None:
    t, h, d = (size // 16) ** 2 + 1, 12, 64
    q, k, v = torch.randn(1, t, 3, h, d, generator=torch.Generator().manual_seed(0)).permute(2, 0, 3, 1, 4)
    s = d**-0.5

    def svc_torch():
        with TorchOnly():
            return intra_correlation(q, k, v, s)

    def attn_torch():
        with TorchOnly():
            return DenseEncoder._attention_with_map(q, k, v, s, t)

    variants = {
        "svc torch": svc_torch,
        "svc native": lambda: intra_correlation(q, k, v, s),
        "attention torch": attn_torch,
        "attention native": lambda: DenseEncoder._attention_with_map(q, k, v, s, t),
        "sdpa (no map)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    with torch.no_grad():
        err_svc = ((variants["svc native"]() - svc_torch()).abs().max() / svc_torch().abs().max()).item()
        err_attn = ((variants["attention native"]()[1] - attn_torch()[1]).abs().max()
                    / attn_torch()[1].abs().max()).item()
        times = interleaved(variants, rounds)
    ms = "   ".join(f"{name} {statistics.median(v) * 1e3:.2f} ms" for name, v in times.items())
    print(f"size {size} (T {t}): {ms}")
    for what in ("svc", "attention"):
        ratios = [a / b for a, b in zip(times[f"{what} torch"], times[f"{what} native"])]
        err = err_svc if what == "svc" else err_attn
        print(f"  {what}: torch/native {spread(ratios)}   max|native - torch| / max|torch| {err:.1e}")


def forward(size: int, batch: int, rounds: int) -> None:
    bare = open_clip.create_model("ViT-B-16", force_quick_gelu=True, force_image_size=size).eval()
    bare.requires_grad_(False)
    encoder = DenseEncoder(open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval().visual)
    encoder.requires_grad_(False)
    svc, aff = encoder.last_blocks(5), encoder.last_blocks(6)
    x = torch.randn(batch, 3, size, size)

    def calibrated_torch():
        with TorchOnly():
            return encoder(x, svc, aff, return_tokens=False)

    variants = {
        "bare open_clip": lambda: bare.encode_image(x),
        "calibrated, native maps": lambda: encoder(x, svc, aff, return_tokens=False),
        "calibrated, torch maps": calibrated_torch,
    }
    with torch.no_grad():
        a, b = variants["calibrated, native maps"](), calibrated_torch()
        err = ((a.features - b.features).abs().max() / b.features.abs().max()).item()
        times = interleaved(variants, rounds)
    ms = "   ".join(f"{name} {statistics.median(v) * 1e3 / batch:.1f} ms/img" for name, v in times.items())
    print(f"size {size} batch {batch}: {ms}")
    bar, nat, tor = (times[n] for n in variants)
    print(f"  torch maps / native maps {spread([t / n for t, n in zip(tor, nat)])}   "
          f"bare / calibrated: native {spread([b / n for b, n in zip(bar, nat)])}, "
          f"torch {spread([b / t for b, t in zip(bar, tor)])}   features max|Δ| / max {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="input sizes (default 224,320,448; --forward: 320)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; --forward: 8)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave default)")
    ap.add_argument("--forward", action="store_true", help="the whole calibrated forward instead of the kernels")
    ap.add_argument("--batch", type=int, default=1, help="--forward: images per call")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = native.attention_library()
    if lib is None:
        ap.error("the native attention kernels are not available here (see the warning above)")
    sizes = [int(v) for v in (args.sizes or ("320" if args.forward else "224,320,448")).split(",")]
    print(f"torch threads {torch.get_num_threads()}, kernels built with OpenMP: {bool(lib.excelseg_attn_openmp())}, "
          f"vector tile {lib.excelseg_attn_tile()} floats")
    torch.manual_seed(0)
    for size in sizes:
        if args.forward:
            forward(size, args.batch, args.rounds or 8)
        else:
            kernels(size, args.rounds or 15)


if __name__ == "__main__":
    main()
