"""Speed and peak memory of one ExCEL training iteration: batch 4 @ 320, ViT-B/16 (random weights; speed does not
depend on them), 20 VOC classes + 25 background words, two classes per image.

    python benchmarks/train_step.py [--device cpu|cuda] [--threads 2] [--rounds 2] [--amp bf16]

Settings, timed **interleaved** in the same process (round-robin, ``--rounds`` each, after one warm-up each):

* ``before``      — n_iter < 14k: one frozen CLIP pass, static CAMs, attention refinement, PAR, losses, step;
* ``after``       — n_iter ≥ 14k: LVC CAMs from the cached SVC stream (no second CLIP pass), P-guided refinement;
* ``after24k``    — n_iter ≥ 24k: as ``after`` with the affinity target from the model's own prediction;
* ``ref-equiv``   — as ``after`` but with a second full CLIP forward for the LVC CAMs (what the reference does).

One iteration = forward, pseudo-labels, losses, backward, AdamW step. Printed: seconds per iteration (median of the
rounds), the ratio ``ref-equiv / after``, a per-stage split of ``after`` and the peak memory: CPU — peak RSS of a
fresh process running 2 iterations of that setting (``ru_maxrss``); CUDA — ``torch.cuda.max_memory_allocated``
per setting (autocast ``--amp``, default bf16). The reference code itself, on the 2-thread AMD EPYC machine class:
8.9 s/it before the switch, 12.8 s/it after, 10.0 s/it after 24k, peak RSS 3.05 GB (issue 11).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SETTINGS = {"before": 0, "after": 14000, "after24k": 24000, "ref-equiv": 14000}
REFERENCE = {"before": 8.9, "after": 12.8, "after24k": 10.0}


def build(device: torch.device):
    import open_clip

    from excelseg.config import PAPER_VOC
    from excelseg.model import ExcelModel
    from excelseg.train.optim import build_optimizer

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    text = F.normalize(torch.randn(45, 512), dim=-1)
    model = ExcelModel(clip.visual.eval().requires_grad_(False), text, 20, PAPER_VOC).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 320, 320, generator=g).to(device)
    cls = torch.zeros(4, 20)
    for b, (i, j) in enumerate([(2, 7), (11, 14), (0, 19), (8, 11)]):
        cls[b, [i, j]] = 1
    return model, build_optimizer(model.heads, PAPER_VOC.train), x, cls.to(device)


def iteration(model, opt, x, cls, setting: str, amp, timings: dict | None = None) -> None:
    from excelseg.train.optim import set_lrs
    from excelseg.train.step import training_losses

    n_iter = SETTINGS[setting]
    cfg = model.config.train
    dev = x.device

    def mark(key, t0):
        if timings is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return time.perf_counter()

    set_lrs(opt, 100, cfg)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        t0 = time.perf_counter()
        out = model(x)
        t0 = mark("CLIP pass + heads", t0)
        if setting == "ref-equiv":  # the reference's second full CLIP forward for the LVC CAMs
            with torch.no_grad():
                out2 = model(x)
            out2.adapter_fts = out.adapter_fts
            t0 = mark("second CLIP pass", t0)
            cams_out = out2
        else:
            cams_out = out
        if timings is not None:  # split: CAMs + refinement (labels) vs losses, same code as training_losses
            from excelseg.preprocess import denormalize_uint8
            from excelseg.train.step import uses_lvc

            with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                lvc = uses_lvc(n_iter, cfg)
                cams = (model.lvc_cams(cams_out) if lvc else model.static_cams(cams_out)).float()
                t0 = mark("CAMs", t0)
                trans, _, _ = model.transition(out, guided=lvc)
                pseudo = model.pseudo_labels(cams, cls, trans.float(), denormalize_uint8(x.float()), (320, 320))
                t0 = mark("pseudo-labels (refine + PAR)", t0)
            res = training_losses(model, x, cls, n_iter, cfg, out=out, pseudo=pseudo)
        else:
            if setting == "ref-equiv":
                with torch.no_grad():
                    from excelseg.preprocess import denormalize_uint8

                    cams = model.lvc_cams(out2).float()
                    trans, _, _ = model.transition(out, guided=True)
                    pseudo = model.pseudo_labels(cams, cls, trans.float(), denormalize_uint8(x.float()), (320, 320))
                res = training_losses(model, x, cls, n_iter, cfg, out=out, pseudo=pseudo)
            else:
                res = training_losses(model, x, cls, n_iter, cfg, out=out)
        t0 = mark("losses", t0)
    res.loss.backward()
    t0 = mark("backward", t0)
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    mark("optimizer step", t0)


def child(setting: str, threads: int) -> None:
    """Fresh process: 2 iterations of one setting on the CPU; prints peak RSS (GB)."""
    torch.set_num_threads(threads)
    model, opt, x, cls = build(torch.device("cpu"))
    for _ in range(2):
        iteration(model, opt, x, cls, setting, None)
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="CUDA autocast (CPU: off)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = None if device.type == "cpu" or args.amp == "off" else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    model, opt, x, cls = build(device)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, amp {amp or 'off'}; "
          "batch 4 @ 320, ViT-B/16")
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    mem: dict[str, float] = {}
    for s in SETTINGS:  # warm-up
        iteration(model, opt, x, cls, s, amp)
    for _ in range(args.rounds):
        for s in SETTINGS:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            iteration(model, opt, x, cls, s, amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
                mem[s] = max(mem.get(s, 0.0), torch.cuda.max_memory_allocated(device) / 1024**3)
            times[s].append(time.perf_counter() - t0)
    split: dict[str, float] = {}
    iteration(model, opt, x, cls, "after", amp, split)
    if device.type == "cpu":
        here = Path(__file__).resolve()
        for s in SETTINGS:
            out = subprocess.run([sys.executable, str(here), "--child", s, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            mem[s] = json.loads(out.strip().splitlines()[-1])["peak_rss_gb"]
    what = "peak RSS" if device.type == "cpu" else "max_memory_allocated"
    med = {s: statistics.median(v) for s, v in times.items()}
    for s in SETTINGS:
        ref = f"; reference {REFERENCE[s]} s/it → {REFERENCE[s] / med[s]:.2f}x" if s in REFERENCE and device.type == "cpu" else ""
        print(f"{s:10s} {med[s]:7.3f} s/it  ({' '.join(f'{t:.3f}' for t in times[s])})  {what} {mem[s]:.2f} GB{ref}")
    print(f"ref-equiv / after = {med['ref-equiv'] / med['after']:.2f}x (same run, interleaved)")
    print("split of one 'after' iteration: " + ", ".join(f"{k} {v:.3f} s" for k, v in split.items()))


if __name__ == "__main__":
    main()
