"""Throughput of the training-free pipeline vs a bare open_clip ``encode_image``, in one process.

    python benchmarks/cam_throughput.py [--images 16] [--device cpu] [--threads 2]

(a) bare open_clip ``encode_image`` (ViT-B/16, QuickGELU, image size forced to the input size), (b) the full
excelseg training-free pipeline — preprocessing, dense forward + SVC, CAMs against the VOC vocabulary, affinity
refinement, box mask, PAR at the original image size, pseudo-label — on the VOC sample images at their original
sizes (synthetic 500×375 images when ../shared is absent). Both use random weights: speed does not depend on
them. Prints images/s for 320 and 448 inputs at batch 1 and 8, the ratio b/a, and last the line
``ratio 320 batch1: <b/a>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from excelseg.config import PAPER_VOC, CamConfig
from excelseg.images import read_image, to_rgb_array
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


def timed(fn, n_images: int, batch: int) -> float:
    """images/s of ``fn(start, batch)`` over ``n_images`` images after one warm-up batch."""
    fn(0, batch)
    t0 = time.perf_counter()
    for start in range(0, n_images, batch):
        fn(start, batch)
    return n_images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16, help="images timed per setting (multiple of 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = sample_images()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(images)} sample images "
          f"({'VOC sample' if (SAMPLE / 'manifest.json').is_file() else 'synthetic'})")
    ratios = {}
    for size in (320, 448):
        bare = open_clip.create_model("ViT-B-16", force_quick_gelu=True, force_image_size=size).eval().to(device)
        bare.requires_grad_(False)
        full_model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval().to(device)
        full_model.requires_grad_(False)
        clip = LoadedClip(model=full_model, tokenizer=open_clip.get_tokenizer("ViT-B-16"), name="ViT-B-16",
                          identity="random", source="random init", mean=(0.0,) * 3, std=(1.0,) * 3)
        cfg = PAPER_VOC.with_(cam=CamConfig(size=(size, size)))
        predictor = CamPredictor(clip, vocabulary="voc", config=cfg, device=device)
        x_all = torch.randn(8, 3, size, size, device=device)

        def run_bare(start: int, batch: int, bare=bare, x_all=x_all) -> None:
            with torch.no_grad():
                bare.encode_image(x_all[:batch])
            if device.type == "cuda":
                torch.cuda.synchronize()

        def run_full(start: int, batch: int, predictor=predictor) -> None:
            chunk = [images[(start + i) % len(images)] for i in range(batch)]
            states = predictor.encode_batch([rgb for rgb, _ in chunk])
            for state, (_, classes) in zip(states, chunk):
                predictor.predict_state(state, classes)
            if device.type == "cuda":
                torch.cuda.synchronize()

        for batch in (1, 8):
            a = timed(run_bare, args.images, batch)
            b = timed(run_full, args.images, batch)
            ratios[(size, batch)] = b / a
            print(f"size {size} batch {batch}: (a) open_clip encode_image {a:6.2f} img/s   "
                  f"(b) excelseg training-free {b:6.2f} img/s   b/a {b / a:.2f}")
    print(f"ratio 320 batch1: {ratios[(320, 1)]:.2f}")


if __name__ == "__main__":
    main()
