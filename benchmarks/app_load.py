"""Load check of ``excelseg app``: concurrent requests through the page's API, results checked, server memory.

Starts ``excelseg app --clip synthetic`` on a free loopback port in its own process (offline, one torch thread),
then, for each round, fires ``--requests`` requests at once through ``gradio_client`` (the same ``/segment``
endpoint and queue the page uses), each with its own generated scene — distinct sizes and class names — and checks
that every answer belongs to its own request: the palette PNG has that scene's size, the legend names only that
scene's classes and the PNG's label values are exactly the legend's. Prints the wall time of each round, the
per-request latencies and the server's resident memory (VmRSS; VmHWM = peak) before and after.

    python benchmarks/app_load.py --requests 20 --rounds 3

Nothing leaves the machine: the server binds to 127.0.0.1 and Gradio's analytics are off.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from excelseg.app import app_process


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB (Linux /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024
            for k in ("VmRSS", "VmHWM")}


def scenes(n: int, round_index: int, folder: Path) -> list[tuple[Path, list[str], tuple[int, int]]]:
    """``n`` generated scenes of distinct sizes (so a mixed-up answer shows), saved as PNG."""
    from excelseg.synthetic import SceneGenerator

    out = []
    for i in range(n):
        size = 128 + 8 * i
        scene = SceneGenerator(size=size, seed=1000 + round_index).scene(i)
        path = folder / f"r{round_index}_scene_{i:02d}.png"
        Image.fromarray(scene.image).save(path)
        out.append((path, list(scene.names), (size, size)))
    return out


def check(answer, names: list[str], size: tuple[int, int]) -> None:
    """An answer of ``/segment`` belongs to the request of ``names`` and ``size``."""
    status, _timing, _overlay, legend_html, _gallery, png_path, npz_path = answer
    if png_path is None:
        raise AssertionError(f"no result: {status}")
    legend = re.findall(r'data-class="([^"]*)" data-label="(\d+)"', legend_html)
    label = np.asarray(Image.open(png_path))
    assert label.shape == size, (label.shape, size)
    assert {n for n, _ in legend} <= set(names), (legend, names)
    assert set(np.unique(label).tolist()) - {0} == {int(v) for _, v in legend}, (legend, np.unique(label))
    with np.load(npz_path) as z:
        assert z["class_names"].tolist() == names and tuple(z["size"]) == size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20, help="concurrent requests per round (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each with new images (default 3)")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="excelseg-app-load-") as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        with app_process(["--clip", "synthetic"], home) as (server, url):
            print(f"server pid {server.pid} ready in {time.perf_counter() - t0:.1f} s at {url}")
            client = Client(url, verbose=False, download_files=str(home / "downloads"))

            def call(path: Path, names: list[str]):
                return client.predict(handle_file(str(path)), ", ".join(names), "typed names", "synthetic", None,
                                      True, True, True, True, False, "svc", api_name="/segment")

            def timed(item) -> float:
                start = time.perf_counter()
                answer = call(item[0], item[1])
                seconds = time.perf_counter() - start
                check(answer, item[1], item[2])
                return seconds

            warm = scenes(1, 99, home)[0]
            check(call(warm[0], warm[1]), warm[1], warm[2])
            mem0 = memory_mb(server.pid)
            print(f"after one warm-up request: RSS {mem0['VmRSS']:.0f} MB (peak {mem0['VmHWM']:.0f} MB)")
            for r in range(args.rounds):
                batch = scenes(args.requests, r, home)
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.requests) as pool:
                    latencies = list(pool.map(timed, batch))
                wall = time.perf_counter() - start
                mem = memory_mb(server.pid)
                print(f"round {r + 1}: {args.requests} concurrent requests, all correct, in {wall:.1f} s "
                      f"(latency min {min(latencies):.2f} / median {statistics.median(latencies):.2f} / "
                      f"max {max(latencies):.2f} s); server RSS {mem['VmRSS']:.0f} MB "
                      f"(+{mem['VmRSS'] - mem0['VmRSS']:.0f} since warm-up), peak {mem['VmHWM']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
