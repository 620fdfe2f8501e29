"""Per-image CPU time of segmentation (MS + flip) next to CAMs, in one process, interleaved.

    python benchmarks/segment_vs_cam.py [--images 6] [--threads 2] [--rounds 2]

Random ViT-B/16 (open_clip architecture, random init: speed does not depend on the weights) and random heads,
the VOC sample images at their original sizes (synthetic 500×375 images when ../shared is absent). Times per
image, batch 1, for (a) ``CamPredictor`` training-free (320, single scale), (b) ``CamPredictor`` with the heads
(LVC CAMs: [x, flip x] forward, calibrated stream re-run, P-guided refinement), (c) ``Segmenter`` single scale
(320, no flip), (d) ``Segmenter`` MS + flip (0.7, 1.0, 1.2, 1.5 × 320, VOC quirk: no flip at 1.0), each round
running every mode on every image in turn. Prints s/image per mode and the ratios to (a).
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from excelseg.config import PAPER_VOC, SegmentConfig
from excelseg.heads import ExcelHeads
from excelseg.io.checkpoint import HeadsCheckpoint
from excelseg.predictor import CamPredictor
from excelseg.segmenter import Segmenter
from excelseg.vocab import Vocabulary
from excelseg.weights import LoadedClip

try:
    from cam_throughput import sample_images
except ImportError:  # run from the repository root
    from benchmarks.cam_throughput import sample_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval().requires_grad_(False)
    clip = LoadedClip(model, open_clip.get_tokenizer("ViT-B-16"), "ViT-B-16", "random:vit-b-16", "random",
                      (0.5,) * 3, (0.5,) * 3)
    voc = Vocabulary.named("voc")
    heads = ExcelHeads(21).eval()
    ckpt = HeadsCheckpoint(heads.state_dict(), list(voc.names), clip.identity, PAPER_VOC, {"vocabulary": "voc"})
    cam = CamPredictor(clip, vocabulary="voc", config=PAPER_VOC, device="cpu")
    lvc = CamPredictor(clip, config=PAPER_VOC, device="cpu", checkpoint=ckpt)
    seg = Segmenter(clip, heads, voc.names, config=PAPER_VOC, device="cpu")
    single = Segmenter(clip, heads, voc.names, config=PAPER_VOC.with_(
        segment=SegmentConfig(scales=(1.0,), flip=False)), device="cpu")
    images = sample_images()[: args.images]
    modes = {
        "cam (training-free, 320)": lambda im, cls: cam.set_image(im).predict(cls),
        "cam --checkpoint (LVC + flip)": lambda im, cls: lvc.set_image(im).predict(cls),
        "segment single-scale 320": lambda im, cls: single.predict(im),
        "segment MS+flip": lambda im, cls: seg.predict(im),
    }
    times = {k: [] for k in modes}
    for im, cls in images[:1]:  # warm-up
        for fn in modes.values():
            fn(im, cls)
    for _ in range(args.rounds):
        for im, cls in images:
            for name, fn in modes.items():
                t = time.perf_counter()
                fn(im, cls)
                times[name].append(time.perf_counter() - t)
    base = sum(times["cam (training-free, 320)"]) / len(times["cam (training-free, 320)"])
    print(f"{len(images)} images × {args.rounds} rounds, {args.threads} threads, CPU")
    for name, ts in times.items():
        mean = sum(ts) / len(ts)
        print(f"  {name:32s} {mean:6.2f} s/img   ×{mean / base:4.2f} of cam")


if __name__ == "__main__":
    main()
