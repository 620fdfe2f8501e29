"""GPU figures in one short run: training-free CAM throughput and the training step, with peak memory.

    python benchmarks/gpu_suite.py                    # CUDA: the full table (< 5 min on one GPU)
    python benchmarks/gpu_suite.py --device cpu --quick   # smoke test (what the test suite runs)

Weights are a random ViT-B/16 (open_clip, QuickGELU): speed and memory do not depend on their values. Images are
random 500×375 RGB (VOC's typical size). For each input size (320, 448), batch (1, 8, 32) and precision (fp32,
bf16: ``CamPredictor(precision=)``, autocast for the CLIP forward only), after one warm-up batch, the batches are timed with
``torch.cuda.synchronize`` and the peak of ``torch.cuda.max_memory_allocated`` is read. Then the training step of
``benchmarks/train_step.py`` (batch 4 @ 320, before / after the LVC switch; bf16 autocast on CUDA).
Prints one table and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import open_clip
import torch

from excelseg.config import PAPER_VOC, load_config
from excelseg.predictor import CamPredictor
from excelseg.weights import LoadedClip


def random_clip(device: torch.device, tiny: bool = False) -> LoadedClip:
    """Random ViT-B/16 (or, with ``tiny``, a 2-block width-64 ViT for a seconds-long smoke test)."""
    torch.manual_seed(0)
    if tiny:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(32, CLIPVisionCfg(layers=6, width=64, patch_size=16, image_size=64, head_width=32),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1), quick_gelu=True)
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    model = model.eval().requires_grad_(False)
    return LoadedClip(model.to(device), open_clip.get_tokenizer("ViT-B-16"), "ViT-B-16 (random)", "random:0",
                      "benchmark", tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cam_rate(clip: LoadedClip, device: torch.device, size: int, batch: int, precision: str, batches: int,
             images: list[np.ndarray], classes: list[str]) -> dict:
    from dataclasses import replace

    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(size, size)))
    predictor = CamPredictor(clip, vocabulary="voc", config=cfg, device=device, precision=precision)

    def one(i: int) -> None:
        chunk = [images[(i * batch + j) % len(images)] for j in range(batch)]
        for state in predictor.encode_batch(chunk):
            predictor.predict_state(state, classes)

    one(0)  # warm-up (kernels, text features)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(batches):
        t0 = time.perf_counter()
        one(i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    per_batch = statistics.median(times)
    return {"size": size, "batch": batch, "precision": precision, "images_per_s": batch / per_batch,
            "s_per_batch": per_batch, "peak_mib": peak}


def train_rows(device: torch.device, rounds: int) -> list[str]:
    """``benchmarks/train_step.py`` (s/iteration and peak memory before / after the LVC switch, bf16 autocast on
    CUDA), run as a child process; returns its printed lines."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("train_step.py")
    proc = subprocess.run([sys.executable, str(script), "--device", str(device), "--rounds", str(rounds)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return [f"train_step.py failed: {proc.stderr.strip().splitlines()[-1:]}"]
    return proc.stdout.strip().splitlines()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="one size, batches 1 and 2, one timed batch (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random ViT instead of ViT-B/16 (smoke test)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per setting (default 3)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: use --device cpu (smoke test) or run on a GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the parity setting)
    clip = random_clip(device, args.tiny)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(8)]
    classes = ["cat", "dog"]
    sizes, batches = ((320,), (1, 2)) if args.quick else ((320, 448), (1, 8, 32))
    precisions = ("fp32", "bf16")
    rows = []
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; config voc ({load_config('voc').cam.svc_last_blocks} SVC blocks)")
    print(f"{'size':>5}{'batch':>6}{'precision':>10}{'img/s':>10}{'s/batch':>10}{'peak MiB':>10}")
    for size in sizes:
        for batch in batches:
            for precision in precisions:
                r = cam_rate(clip, device, size, batch, precision, 1 if args.quick else args.batches, images, classes)
                rows.append(r)
                print(f"{size:>5}{batch:>6}{precision:>10}{r['images_per_s']:>10.2f}{r['s_per_batch']:>10.3f}"
                      f"{r['peak_mib']:>10.0f}", flush=True)
    train = [] if args.no_train else train_rows(device, 1 if args.quick else 3)
    for line in train:
        print(f"train step | {line}", flush=True)
    print(f"suite time {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "cam": rows, "train": train}, fh, indent=1)


if __name__ == "__main__":
    main()
