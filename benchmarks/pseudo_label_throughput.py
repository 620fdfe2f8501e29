"""Throughput of ``excelseg pseudo-label`` (the batch command, end to end) on the VOC sample images.

    python benchmarks/pseudo_label_throughput.py [--device cpu] [--threads N] [--repeat 1] [--rounds 3]
        [--workers 0,2] [--batch-sizes 1,4] [--overlap on,off] [--save-cams]

Builds a miniature VOC tree in a temporary folder from ``shared/data/voc_sample`` (the 5 original images at their
own sizes and the 14 513×513 crops, saved as JPEG; ``--repeat`` copies each under more ids), prepares it, and runs
the real command (``python -m excelseg.cli pseudo-label``, a fresh process per setting) on the ``train`` split with
the full ViT-B/16 parity random weights (speed does not depend on the weights; regenerated with
``shared/parity/make_random_clip.py --seed 0`` into ``~/.cache/excelseg/parity/`` when absent), paper settings
(320 input, single scale, PAR at full size), for ``--workers`` 0 vs 2, ``--batch-size`` 1 vs 4 and the I/O overlap on
vs off (``--no-overlap``: decoding and writing in the main thread instead of alongside the forward). The rate is
the command's own (its summary line: images / seconds of the labelling loop, model loading excluded).

Built for a shared machine whose speed drifts: one untimed warm-up run, then ``--rounds`` rounds in which every
setting runs once, in the same order; each round gives each setting's rate relative to the first setting of that
round, so the settings are compared side by side in time. Prints per setting the median images/s with its spread
(min–max over the rounds) and the median ratio to the first setting with its spread, then the projected hours for
VOC train_aug (10,582 images) and COCO train (82,081 images) at the best setting, for one process on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE.parent / "shared" if (HERE.parent / "shared").is_dir() else Path("/work/shared")
SAMPLE = SHARED / "data" / "voc_sample"
MAKE_CLIP = SHARED / "parity" / "make_random_clip.py"
CACHE = Path(os.environ.get("EXCELSEG_PARITY_CACHE", Path.home() / ".cache" / "excelseg" / "parity"))
SETS = {"VOC train_aug": 10_582, "COCO train": 82_081}
RATE = re.compile(r"done: (\d+) written.*\(([\d.]+) img/s")


def clip_weights() -> Path:
    path = CACHE / "clip_rand_seed0.pt"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / "clip_rand_seed0.pt.tmp"
        subprocess.run([sys.executable, str(MAKE_CLIP), "--seed", "0", "--out", str(tmp)], check=True)
        os.replace(tmp, path)
    return path


def build_voc(base: Path, repeat: int) -> tuple[Path, int]:
    """VOCdevkit/VOC2012 with every sample image (× ``repeat``) in train.txt; returns (root, image count)."""
    groups = json.loads((SAMPLE / "manifest.json").read_text())
    root = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    ids = []
    for entries in groups.values():
        for name, e in entries.items():
            for r in range(repeat):
                image_id = name if r == 0 else f"{name}_r{r}"
                with Image.open(SAMPLE / e["image"]) as im:
                    im.convert("RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
                shutil.copy(SAMPLE / e["mask"], root / "SegmentationClass" / f"{image_id}.png")
                ids.append(image_id)
    ids = sorted(set(ids))
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(ids[0] + "\n")
    subprocess.run([sys.executable, "-m", "excelseg.cli", "prepare", "--dataset", "voc", "--root", str(root),
                    "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
    return root, len(ids)


def label(setting: tuple[int, int, bool]) -> str:
    workers, batch, overlap = setting
    return f"workers {workers} batch {batch} overlap {'on' if overlap else 'off'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="ids per sample image (more images per setting)")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--overlap", default="on,off", help="I/O overlap settings to compare (on, off or both)")
    ap.add_argument("--save-cams", action="store_true", help="also write the CAM archives (more I/O per image)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every setting once per round)")
    args = ap.parse_args()
    if not (SAMPLE / "manifest.json").is_file():
        sys.exit(f"VOC sample images not found at {SAMPLE}")
    weights = clip_weights()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    settings = [(int(w), int(b), o == "on") for w in args.workers.split(",") for b in args.batch_sizes.split(",")
                for o in args.overlap.split(",")]
    with tempfile.TemporaryDirectory(prefix="pl_bench_") as tmp:
        root, n = build_voc(Path(tmp), args.repeat)
        print(f"{n} VOC sample images, ViT-B/16 parity random weights, device {args.device}, "
              f"threads {args.threads or 'default'}, {os.cpu_count()} CPUs; {args.rounds} interleaved rounds "
              f"after a warm-up run", flush=True)

        def run(workers: int, batch: int, overlap: bool) -> float:
            out = Path(tmp) / f"out_w{workers}_b{batch}_{int(overlap)}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "excelseg.cli", "pseudo-label", "--root", str(root), "--split", "train",
                   "--out-dir", str(out), "--clip", str(weights), "--device", args.device,
                   "--workers", str(workers), "--batch-size", str(batch)]
            cmd += ([] if overlap else ["--no-overlap"]) + (["--save-cams"] if args.save_cams else [])
            res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
            m = RATE.search(res.stdout)
            if res.returncode != 0 or m is None or int(m.group(1)) != n:
                sys.exit(f"run failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
            return float(m.group(2))

        run(*settings[0])  # warm-up: file cache, weights, first-run costs
        rates: dict[tuple, list[float]] = {s: [] for s in settings}
        ratios: dict[tuple, list[float]] = {s: [] for s in settings}
        for r in range(args.rounds):
            for setting in settings:
                rates[setting].append(run(*setting))
            for setting in settings:
                ratios[setting].append(rates[setting][-1] / rates[settings[0]][-1])
            print(f"round {r}: " + "   ".join(f"{label(s)} {rates[s][-1]:.3f}" for s in settings) + " img/s",
                  flush=True)
    for setting, values in rates.items():
        rel = ratios[setting]
        print(f"{label(setting)}: {statistics.median(values):.3f} img/s "
              f"(spread {min(values):.3f}-{max(values):.3f}); vs {label(settings[0])}: "
              f"{statistics.median(rel):.2f} (spread {min(rel):.2f}-{max(rel):.2f})")
    setting, best = max(((k, statistics.median(v)) for k, v in rates.items()), key=lambda kv: kv[1])
    print(f"best: {label(setting)} at {best:.3f} img/s (one process)")
    for name, count in SETS.items():
        print(f"projected {name} ({count:,} images): {count / best / 3600:.1f} h")


if __name__ == "__main__":
    main()
