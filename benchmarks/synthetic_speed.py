"""Scene generation speed of :mod:`excelseg.synthetic` on one CPU core.

    python benchmarks/synthetic_speed.py [--scenes 400] [--repeats 3] [--sizes 64 96 128]

BLAS/OpenMP are limited to one thread (environment, before numpy loads) and ``torch.set_num_threads(1)`` is
called; generation itself is numpy only. For each image size it generates ``--scenes`` consecutive scenes
(default generator: 1–3 objects, 16 classes) ``--repeats`` times and prints the best and the median rate in
scenes/s. The last line is ``scenes/s at 128: <best>``. The target is ≥ 200 scenes/s at 128×128.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import statistics
import time

import torch

from excelseg.synthetic import SceneGenerator


def rate(size: int, scenes: int, seed: int) -> float:
    gen = SceneGenerator(size=size, seed=seed)
    gen.scene(10**9)  # warm-up: interpolation matrices, caches
    start = time.perf_counter()
    for i in range(scenes):
        gen.scene(i)
    return scenes / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    best_at = {}
    for size in args.sizes:
        rates = [rate(size, args.scenes, args.seed + r) for r in range(args.repeats)]
        best_at[size] = max(rates)
        print(f"{size:4d} px: best {max(rates):7.1f} scenes/s, median {statistics.median(rates):7.1f} scenes/s "
              f"({args.scenes} scenes x {args.repeats})")
    if 128 in best_at:
        print(f"scenes/s at 128: {best_at[128]:.1f}")


if __name__ == "__main__":
    main()
