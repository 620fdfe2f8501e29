"""GPU figures in one short run: training-free CAM throughput against the bare forward, kernels per image, and the
training step, with peak memory; and a CPU proxy of the device path's operation count (issue 22).

    python benchmarks/gpu_suite.py                    # CUDA: the full table (< 5 min on one GPU)
    python benchmarks/gpu_suite.py --device cpu --quick --tiny   # smoke test (what the test suite runs)
    python benchmarks/gpu_suite.py --device cpu --count-ops      # CPU proxy: aten calls per image, batch 1 and 32

Weights are a random ViT-B/16 (open_clip, QuickGELU): speed and memory do not depend on their values. Images are
random 500×375 RGB (VOC's typical size). For each input size (320, 448), batch (1, 8, 32) and precision (fp32,
bf16: ``CamPredictor(precision=)``, autocast for the CLIP forward only), after one warm-up batch, the batches are
timed with ``torch.cuda.synchronize`` and the peak of ``torch.cuda.max_memory_allocated`` is read; the pipeline is
``encode_batch`` + one batched ``predict_states``. The bare open_clip ``encode_image`` (same size, batch and
precision) is timed the same way, interleaved batch by batch with the pipeline, and ``ratio`` = pipeline / bare
images/s is the figure. On CUDA one more batch of each runs under ``torch.profiler`` and the device kernels (and
memcpy/memset) it records are counted per image: all of the pipeline, and after the dense forward. Then the
training step of ``benchmarks/train_step.py`` (batch 4 @ 320, before / after the LVC switch; bf16 autocast on
CUDA). Prints one table and writes ``--out`` (JSON) when given.

``--count-ops`` (any device; meant for a machine without a GPU) counts, with a ``TorchDispatchMode``, the aten
operator calls per image of the device path after the forward at batch 1 and 32, split into calls and kernels
(calls that are not views: each is a kernel launch on a GPU) and by part of the stage:

* the pseudo-label stage as the trainer runs it (``ExcelModel.pseudo_labels``: transition matrix, class selection,
  box masks, refinement, PAR, labels; 20 VOC classes with 1–3 present per image, a 20×20 patch grid, 320×320
  labels), with PAR's backend forced: ``torch`` (streamed, as on a GPU: one softmax band), ``gather`` (the torch
  path ``auto`` takes on a GPU without Triton) and ``triton`` (its launches counted as one op each and not run,
  so the CPU does not interpret them; everything else runs); ``--quick``: batches 1 and 2, 64×64 labels;
* the same stage with 4 different output sizes in the batch (one PAR call per size);
* ``CamPredictor.predict_states`` (training-free: CAMs of every view, then the stage) on a tiny random CLIP, PAR
  forced to ``gather``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import time
from collections import Counter

import numpy as np
import open_clip
import torch

from excelseg.config import PAPER_VOC, load_config
from excelseg.predictor import CamPredictor
from excelseg.weights import LoadedClip


def _random_model(tiny: bool, image_size: int | None = None):
    torch.manual_seed(0)
    if tiny:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(32, CLIPVisionCfg(layers=6, width=64, patch_size=16, image_size=image_size or 64, head_width=32),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1), quick_gelu=True)
    else:
        model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True,
                                       **({"force_image_size": image_size} if image_size else {}))
    return model.eval().requires_grad_(False)


def random_clip(device: torch.device, tiny: bool = False) -> LoadedClip:
    """Random ViT-B/16 (or, with ``tiny``, a 6-block width-64 ViT for a seconds-long smoke test)."""
    model = _random_model(tiny)
    return LoadedClip(model.to(device), open_clip.get_tokenizer("ViT-B-16"), "ViT-B-16 (random)", "random:0",
                      "benchmark", tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_kernels(device: torch.device, fn) -> int:
    """Device kernels (and memcpy/memset) that ``fn()`` launches, from torch.profiler; -1 off CUDA."""
    if device.type != "cuda":
        return -1
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def cam_rate(clip: LoadedClip, bare, device: torch.device, size: int, batch: int, precision: str, batches: int,
             images: list[np.ndarray], classes: list[str]) -> dict:
    """The pipeline (``encode_batch`` + batched ``predict_states``) and the bare ``encode_image`` of ``bare`` on the
    same batch size, interleaved batch by batch; kernels per image on CUDA."""
    from dataclasses import replace

    cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(size, size)))
    predictor = CamPredictor(clip, vocabulary="voc", config=cfg, device=device, precision=precision)
    x = torch.randn(batch, 3, size, size, device=device)

    def chunk(i: int) -> list[np.ndarray]:
        return [images[(i * batch + j) % len(images)] for j in range(batch)]

    def label(states) -> None:
        predictor.predict_states(states, [classes] * len(states))

    def one(i: int) -> None:
        label(predictor.encode_batch(chunk(i)))

    def one_bare() -> None:
        with torch.no_grad(), _autocast(device, precision):
            bare.encode_image(x)

    one(0)  # warm-up (kernels, text features)
    one_bare()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, bare_times = [], []
    for i in range(batches):
        t0 = time.perf_counter()
        one(i + 1)
        sync(device)
        t1 = time.perf_counter()
        one_bare()
        sync(device)
        times.append(t1 - t0)
        bare_times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    per_batch, bare_batch = statistics.median(times), statistics.median(bare_times)
    states = predictor.encode_batch(chunk(0))
    kernels = device_kernels(device, lambda: one(0))
    after = device_kernels(device, lambda: label(states))
    return {"size": size, "batch": batch, "precision": precision, "images_per_s": batch / per_batch,
            "s_per_batch": per_batch, "bare_images_per_s": batch / bare_batch, "ratio": bare_batch / per_batch,
            "kernels_per_image": kernels / batch if kernels >= 0 else None,
            "kernels_after_forward_per_image": after / batch if after >= 0 else None, "peak_mib": peak}


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


# ---- --count-ops: aten calls per image of the device path (a CPU proxy for kernel launches) ---------------------


class OpCounter:
    """Counts aten calls by part of the stage (``part``: set by the functions :meth:`wrap` patches) and Triton
    launches; every patch is undone when the ``with`` block of :meth:`installed` ends."""

    def __init__(self):
        self.part = "other"
        self.calls, self.kernels, self.ops = Counter(), Counter(), Counter()
        self._stack = contextlib.ExitStack()

    def patch(self, owner, name: str, value) -> None:
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._stack.callback(setattr, owner, name, old)

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return fn(*args, **kwargs)
            finally:
                self.part = outer

        self.patch(owner, name, inner)

    @contextlib.contextmanager
    def installed(self):
        with self._stack:
            yield self

    def launch(self, kernel, grid, *args, **meta) -> None:  # stands in for excelseg._triton_par._launch
        self.calls[self.part] += 1
        self.kernels[self.part] += 1
        self.ops[f"{self.part}: triton launch"] += 1

    def clear(self) -> None:
        self.calls.clear(), self.kernels.clear(), self.ops.clear()

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.calls[counter.part] += 1
                if not func.is_view:
                    counter.kernels[counter.part] += 1
                    counter.ops[f"{counter.part}: {func.overloadpacket.__name__}"] += 1
                return func(*args, **(kwargs or {}))

        return Mode()


def _stage_inputs(b: int, sizes: list[tuple[int, int]], seed: int = 0):
    """Trainer-like inputs: (B, 20, 20, 20) smooth CAMs, 1–3 of 20 VOC classes per image, (B, 400, 400) attention,
    (B, 3, 320, 320) guidance images."""
    g = torch.Generator().manual_seed(seed)
    cams = torch.nn.functional.interpolate(torch.rand(b, 20, 5, 5, generator=g), size=(20, 20), mode="bilinear",
                                           align_corners=False)
    cls = torch.zeros(b, 20)
    for i in range(b):
        cls[i, torch.randperm(20, generator=g)[: 1 + i % 3]] = 1
    attn = torch.rand(b, 400, 400, generator=g)
    return cams, cls, attn, torch.rand(b, 3, 320, 320, generator=g) * 255, sizes


def _stage(cams, cls, attn, images, sizes) -> None:
    """The pseudo-label stage after the forward, as ``ExcelModel.pseudo_labels`` runs it (paper settings)."""
    from excelseg.pseudo import present_classes, pseudo_labels, select_classes
    from excelseg.refine import transition_matrix

    trans = transition_matrix(attn, 3)
    classes, valid = present_classes(cls)
    pseudo_labels(select_classes(cams, classes, valid), classes + 1, images, sizes, valid=valid, trans=trans,
                  box_threshold=0.79)


def count_ops(device: torch.device, batches: tuple[int, ...] = (1, 32), label_size: int = 320,
              predictor: bool = True) -> list[dict]:
    """The ``--count-ops`` table (also returned as rows). Leaves no patch behind."""
    import excelseg.par as par_mod
    import excelseg.pseudo as pseudo_mod
    import excelseg.refine as refine_mod
    from excelseg.model import ExcelModel
    from excelseg.par import use_backend

    counter = OpCounter()
    rows = []

    def run(what: str, backend: str, b: int, fn) -> None:
        with torch.no_grad(), use_backend(backend):
            fn()  # warm-up: per-process caches (positional weights, device constants)
            counter.clear()
            t0 = time.perf_counter()
            with counter.mode():
                fn()
        calls, kernels = sum(counter.calls.values()), sum(counter.kernels.values())
        parts = {k: round(v / b, 1) for k, v in sorted(counter.kernels.items(), key=lambda kv: -kv[1])}
        top = [f"{k} {v}" for k, v in counter.ops.most_common(4)]
        rows.append({"path": what, "par": backend, "batch": b, "calls_per_image": calls / b,
                     "kernels_per_image": kernels / b, "kernels_by_part_per_image": parts, "top_ops": top,
                     "s": time.perf_counter() - t0})
        print(f"{what:<30}{backend:>8}{b:>6}{calls / b:>11.1f}{kernels / b:>13.1f}   "
              + ", ".join(f"{k} {v}" for k, v in parts.items()) + "   | top: " + ", ".join(top), flush=True)

    env = os.environ.get("TRITON_INTERPRET")
    with counter.installed():
        # CPU tensors may take the Triton path: its launches are counted and not run (nor interpreted)
        os.environ["TRITON_INTERPRET"] = "1"
        counter._stack.callback(lambda: os.environ.pop("TRITON_INTERPRET") if env is None
                                else os.environ.__setitem__("TRITON_INTERPRET", env))
        counter.wrap(refine_mod, "transition_matrix", "transition")
        counter.wrap(pseudo_mod, "box_mask", "box mask")
        counter.wrap(pseudo_mod, "refine_cams", "refine")
        counter.wrap(pseudo_mod, "class_scores", "scores")
        counter.wrap(pseudo_mod, "par", "PAR")
        counter.wrap(ExcelModel, "image_cams", "CAMs")
        backends = ["torch", "gather"]
        try:
            from excelseg import _triton_par

            counter.patch(_triton_par, "_launch", counter.launch)
            backends.append("triton")
        except ImportError:
            print("(Triton is not installed: no triton rows)")
        # the torch backend as it runs on a GPU: one softmax band (the CPU's cache-sized bands add ~50 ops each)
        counter.patch(par_mod, "_softmax_band_rows", lambda device, bsz, nn_, h, w: h)

        print("aten calls per image of the device path after the forward (kernels = calls that are not views)")
        print(f"{'path':<30}{'PAR':>8}{'batch':>6}{'calls/img':>11}{'kernels/img':>13}   kernels/img by part "
              f"| top ops (per batch)")
        size = (label_size, label_size)
        for backend in backends:
            for b in batches:
                inputs = _stage_inputs(b, [size] * b)
                run(f"pseudo-label stage {label_size}²", backend, b, lambda inputs=inputs: _stage(*inputs))
        mixed = [(94, 125), (125, 94), (83, 125), (125, 83)]  # 4 output sizes (VOC's shapes, scaled down)
        b = max(batches)
        for backend in backends[1:]:
            inputs = _stage_inputs(b, [mixed[i % 4] for i in range(b)])
            run("pseudo-label stage, 4 sizes", backend, b, lambda inputs=inputs: _stage(*inputs))
        if predictor:
            from dataclasses import replace

            cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(320, 320)))
            pred = CamPredictor(random_clip(device, tiny=True), vocabulary="voc", config=cfg, device=device)
            for b in batches:
                rng = np.random.default_rng(b)
                states = pred.encode_batch([rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(b)])
                run("CamPredictor.predict_states", "gather", b,
                    lambda states=states: pred.predict_states(states, [["cat", "dog"]] * len(states)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="one size, batches 1 and 2, one timed batch (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random ViT instead of ViT-B/16 (smoke test)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per setting (default 3)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    ap.add_argument("--count-ops", action="store_true",
                    help="instead of timing: aten calls per image of the device path at batch 1 and 32 (CPU proxy)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: use --device cpu (smoke test) or run on a GPU machine")
    if args.count_ops:
        if device.type != "cpu":
            raise SystemExit("--count-ops is the CPU proxy: use it with --device cpu (on a GPU the table counts "
                             "kernels with the profiler)")
        start = time.perf_counter()
        rows = count_ops(device, (1, 2) if args.quick else (1, 32), 64 if args.quick else 320)
        print(f"count time {time.perf_counter() - start:.0f} s")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"device": "CPU", "torch": torch.__version__, "count_ops": rows}, fh, indent=1)
        return
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
    print(f"{'size':>5}{'batch':>6}{'precision':>10}{'img/s':>10}{'bare img/s':>12}{'ratio':>7}{'s/batch':>10}"
          f"{'kern/img':>10}{'after fwd':>10}{'peak MiB':>10}")
    for size in sizes:
        bare = _random_model(args.tiny, image_size=size).to(device)
        for batch in batches:
            for precision in precisions:
                r = cam_rate(clip, bare, device, size, batch, precision, 1 if args.quick else args.batches, images,
                             classes)
                rows.append(r)
                kern = "-" if r["kernels_per_image"] is None else f"{r['kernels_per_image']:.0f}"
                after = "-" if r["kernels_after_forward_per_image"] is None else \
                    f"{r['kernels_after_forward_per_image']:.0f}"
                print(f"{size:>5}{batch:>6}{precision:>10}{r['images_per_s']:>10.2f}{r['bare_images_per_s']:>12.2f}"
                      f"{r['ratio']:>7.2f}{r['s_per_batch']:>10.3f}{kern:>10}{after:>10}{r['peak_mib']:>10.0f}",
                      flush=True)
    train = [] if args.no_train else train_rows(device, 1 if args.quick else 3)
    for line in train:
        print(f"train step | {line}", flush=True)
    print(f"suite time {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "cam": rows, "train": train}, fh, indent=1)


if __name__ == "__main__":
    main()
