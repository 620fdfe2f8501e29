"""Wall time of ``excelseg --help`` and every ``excelseg COMMAND --help``, each in a fresh interpreter.

    python benchmarks/cli_help_time.py [--rounds 5]

Prints the median and range per command over the rounds (commands interleaved within each round, so machine
load drifts hit them alike) and last the line ``slowest help median: X s`` (goal: < 0.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = ["", "cam", "pseudo-label", "segment", "prepare", "bank", "describe", "train", "eval", "eval-cams",
            "import-checkpoint", "demo", "train-clip"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    times: dict[str, list[float]] = {c: [] for c in COMMANDS}
    for _ in range(args.rounds):
        for c in COMMANDS:
            argv = [sys.executable, "-m", "excelseg.cli", *([c] if c else []), "--help"]
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times[c].append(time.perf_counter() - t0)
    bare = [sys.executable, "-c", "pass"]
    base = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        subprocess.run(bare, check=True)
        base.append(time.perf_counter() - t0)
    print(f"{'command':<32}{'median s':>10}{'min':>8}{'max':>8}")
    print(f"{'(python -c pass)':<32}{statistics.median(base):>10.3f}{min(base):>8.3f}{max(base):>8.3f}")
    for c, ts in times.items():
        print(f"{'excelseg ' + (c + ' ' if c else '') + '--help':<32}{statistics.median(ts):>10.3f}{min(ts):>8.3f}{max(ts):>8.3f}")
    print(f"slowest help median: {max(statistics.median(ts) for ts in times.values()):.3f} s")


if __name__ == "__main__":
    main()
