"""Where the time of one training-free image goes: torch.profiler over the pipeline, stage timers first.

    python benchmarks/profile_pipeline.py [--device cuda] [--size 320] [--runs 5]

Random ViT-B/16 weights and a random 500×375 image (speed does not depend on either). Prints wall time per stage
(preprocess + dense forward, CAMs + refinement + PAR + label) over ``--runs`` images after a warm-up, then the
profiler's top operators by device time and by CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from excelseg.config import PAPER_VOC
from excelseg.predictor import CamPredictor
from gpu_suite import random_clip, sync


def main() -> None:
    from dataclasses import replace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(args.size, args.size)))
    predictor = CamPredictor(random_clip(device), vocabulary="voc", config=cfg, device=device)
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    classes = ["cat", "dog"]
    predictor.predict_state(predictor.encode_batch([image])[0], classes)  # warm-up
    enc, rest = [], []
    for _ in range(args.runs):
        sync(device)
        t0 = time.perf_counter()
        state = predictor.encode_batch([image])[0]
        sync(device)
        t1 = time.perf_counter()
        predictor.predict_state(state, classes)
        sync(device)
        enc.append(t1 - t0)
        rest.append(time.perf_counter() - t1)
    print(f"{device}: encode (preprocess + dense forward + affinity) {1e3 * statistics.median(enc):.1f} ms, "
          f"predict (CAMs, refinement, PAR, label) {1e3 * statistics.median(rest):.1f} ms per image")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.runs):
            predictor.predict_state(predictor.encode_batch([image])[0], classes)
        sync(device)
    table = prof.key_averages()
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.top))
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
