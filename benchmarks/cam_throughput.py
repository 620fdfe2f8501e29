"""Throughput of the training-free pipeline vs a bare open_clip ``encode_image``, in one process.

    python benchmarks/cam_throughput.py [--images 19] [--rounds 5] [--sizes 320,448] [--batches 1,8] [--device cpu]
                                        [--threads 2]

(a) bare open_clip ``encode_image`` (ViT-B/16, QuickGELU, image size forced to the input size), (b) the full
excelseg training-free pipeline — preprocessing, dense forward + SVC, CAMs against the VOC vocabulary, affinity
refinement, box mask, PAR at the original image size, pseudo-label — on the VOC sample images at their original
sizes (synthetic 500×375 images when ../shared is absent). Both use random weights: speed does not depend on
them.

Measured so that a machine whose speed drifts (shared CPUs) cannot bias the ratio: after one warm-up batch of each,
(a) and (b) alternate batch by batch over ``--images`` images, and this is repeated for ``--rounds`` rounds; every
round gives one ratio (b's images/s over a's, from the two sides' summed times in that round). Prints per setting
the median images/s of each side, the median ratio and its spread (min–max over the rounds), and the split of (b)'s
time into the dense forward (``encode_batch``: preprocessing, forward, SVC) and everything after it
(``predict_state``: CAMs, affinity refinement, box mask, PAR, label), then last the line
``ratio 320 batch1: <median b/a>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from excelseg.config import PAPER_VOC, CamConfig
from excelseg.io.images import read_image, to_rgb_array
from excelseg.predictor import CamPredictor
from excelseg.weights import LoadedClip

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc_sample"


def sample_images() -> list[tuple[np.ndarray, list[str]]]:
    from excelseg.vocab import VOC_CLASSES

    manifest = SAMPLE / "manifest.json"
    if manifest.is_file():
        entries = [e for group in json.loads(manifest.read_text()).values() for e in group.values()]
        return [(to_rgb_array(read_image(SAMPLE / e["image"])), e["classes"]) for e in entries]
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), [VOC_CLASSES[i % 20], VOC_CLASSES[(i + 7) % 20]])
            for i in range(8)]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (spread {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=19, help="images per side per round (rounded down to whole batches)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    ap.add_argument("--sizes", default="320,448")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    if 320 not in sizes or 1 not in batches:
        ap.error("the last line reports size 320 at batch 1: keep 320 in --sizes and 1 in --batches")
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = sample_images()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(images)} sample images "
          f"({'VOC sample' if (SAMPLE / 'manifest.json').is_file() else 'synthetic'})")
    ratios = {}
    for size in sizes:
        bare = open_clip.create_model("ViT-B-16", force_quick_gelu=True, force_image_size=size).eval().to(device)
        bare.requires_grad_(False)
        full_model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval().to(device)
        full_model.requires_grad_(False)
        clip = LoadedClip(model=full_model, tokenizer=open_clip.get_tokenizer("ViT-B-16"), name="ViT-B-16",
                          identity="random", source="random init", mean=(0.0,) * 3, std=(1.0,) * 3)
        cfg = PAPER_VOC.with_(cam=CamConfig(size=(size, size)))
        predictor = CamPredictor(clip, vocabulary="voc", config=cfg, device=device)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def run_bare(x_all: torch.Tensor, bare=bare) -> None:
            with torch.no_grad():
                bare.encode_image(x_all)
            sync()

        def run_full(start: int, batch: int, predictor=predictor) -> tuple[float, float]:
            """Runs the pipeline on one batch; returns (dense forward s, everything after it s)."""
            chunk = [images[(start + i) % len(images)] for i in range(batch)]
            t0 = time.perf_counter()
            states = predictor.encode_batch([rgb for rgb, _ in chunk])
            sync()
            t1 = time.perf_counter()
            for state, (_, classes) in zip(states, chunk):
                predictor.predict_state(state, classes)
            sync()
            return t1 - t0, time.perf_counter() - t1

        for batch in batches:
            x_all = torch.randn(batch, 3, size, size, device=device)
            n = max(batch, args.images // batch * batch)
            run_bare(x_all)  # warm-up
            run_full(0, batch)
            rate_a, rate_b, ratio, dense, after = [], [], [], [], []
            for _ in range(args.rounds):
                t_a = t_b = t_dense = t_after = 0.0
                for start in range(0, n, batch):  # a and b alternate batch by batch
                    t0 = time.perf_counter()
                    run_bare(x_all)
                    t1 = time.perf_counter()
                    d, r = run_full(start, batch)
                    t_a += t1 - t0
                    t_b += time.perf_counter() - t1
                    t_dense += d
                    t_after += r
                rate_a.append(n / t_a)
                rate_b.append(n / t_b)
                ratio.append(t_a / t_b)
                dense.append(t_dense / n)
                after.append(t_after / n)
                print(f"  size {size} batch {batch} round {len(ratio)}: (a) {rate_a[-1]:.2f} img/s   "
                      f"(b) {rate_b[-1]:.2f} img/s   b/a {ratio[-1]:.2f}", flush=True)
            ratios[(size, batch)] = statistics.median(ratio)
            print(f"size {size} batch {batch}: (a) open_clip encode_image {statistics.median(rate_a):6.2f} img/s   "
                  f"(b) excelseg training-free {statistics.median(rate_b):6.2f} img/s   b/a {spread(ratio)}   "
                  f"(b) per image: dense forward {statistics.median(dense):.3f} s + after it "
                  f"{statistics.median(after):.3f} s   [{args.rounds} rounds x {n} images, interleaved]",
                  flush=True)
    print(f"ratio 320 batch1: {ratios[(320, 1)]:.2f}")


if __name__ == "__main__":
    main()
