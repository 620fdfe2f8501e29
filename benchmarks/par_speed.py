"""PAR speed: the implementation before issue 13, the torch backend and the native (C) kernels, interleaved.

    python benchmarks/par_speed.py [--rounds 5] [--threads 1] [--images 19] [--backend native|auto|torch]
    python benchmarks/par_speed.py --bands [--rounds 5] [--images 19]

For every VOC sample image (``shared/data/voc_sample``; with the parity goldens the masks are the real
``[background, classes]`` score maps built from ``refined_static`` at the ground-truth size, otherwise random maps
with 3 channels at the same sizes) it runs the previous PAR (kept below, verbatim, for this comparison only),
``excelseg.par.par(backend="torch")`` and ``par(backend="native")`` on the same inputs. One warm-up pass over
all images (which also builds the native kernels), then ``--rounds`` rounds; inside a round the three alternate
image by image, so a drift in machine speed hits all alike. Prints per round each side's time per image and the
ratios old/native and torch/native, then their median and spread (min–max) over the rounds, and checks the
outputs against the native side: max |Δ| and the number of pixels whose argmax differs. Last line:
``par speed-up: <median old/native>``.

``--bands``: the C kernels on one image at 1 vs 2 threads (with 2, par.c splits the iterations' rows into two bands),
interleaved image by image: per round the time per image of PAR with 21 and with 1 iteration at each thread count,
their difference (20 iterations) and the ratio of the iterations' times 1 thread / 2 threads; then its median and
spread, and that the outputs are bit-identical. Last line: ``iterations 1/2 threads: <median>``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from excelseg import _native as native
from excelseg.par import PAR_DILATIONS, _neighbour_offsets, _positional_affinity, par
from excelseg.pseudo import labels_from_cams

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE.parent / "shared" if (HERE.parent / "shared").is_dir() else Path("/work/shared")
SAMPLE = SHARED / "data" / "voc_sample"
GOLDEN = SHARED / "parity" / "golden"
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


# -- the implementation before issue 13 (reference for timing and outputs only) -------------------------------------


def _old_offsets(dilations):
    return [(dy, dx, dy != 0 and dx != 0) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]


def _old_affinity(img, offs, w_color, w_pos):
    bsz, _, h, w = img.shape
    nn_ = len(offs)
    pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offs)
    padded = F.pad(img, (pad, pad, pad, pad), mode="replicate")

    def nb(dy, dx):
        return padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]

    mean = torch.zeros_like(img)
    for dy, dx, _ in offs:
        mean += nb(dy, dx)
    mean /= nn_
    var = torch.zeros_like(img)
    for dy, dx, _ in offs:
        var.add_((nb(dy, dx) - mean).square_())
    inv = (var / (nn_ - 1)).sqrt_().add_(1e-8).mul_(w_color).reciprocal_()
    logits = torch.empty(bsz, nn_, h, w, dtype=img.dtype, device=img.device)
    for i, (dy, dx, _) in enumerate(offs):
        torch.sum((nb(dy, dx) - img).mul_(inv).square_(), dim=1, out=logits[:, i])
    logits.mul_(-1.0 / img.shape[1])
    aff = logits.softmax(dim=1)
    pos = torch.tensor([abs(dy) * math.sqrt(2.0) if dg else float(max(abs(dy), abs(dx))) for dy, dx, dg in offs],
                       dtype=img.dtype, device=img.device)
    aff += w_pos * (-(pos / pos.std() / w_color).square()).softmax(dim=0).view(1, nn_, 1, 1)
    return aff.unsqueeze(2)


def old_par(image, masks, iters=20, dilations=PAR_DILATIONS, w_color=0.3, w_pos=0.01):
    h, w = masks.shape[-2:]
    img = F.interpolate(image.to(masks), size=(h, w), mode="bilinear", align_corners=True)
    offs = _old_offsets(dilations)
    aff = _old_affinity(img, offs, w_color, w_pos)
    pad = max(dilations)
    out = masks
    for _ in range(iters):
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        acc = torch.empty_like(masks)
        for i, (dy, dx, _) in enumerate(offs):
            nb = padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
            if i == 0:
                torch.mul(nb, aff[:, 0], out=acc)
            else:
                acc.addcmul_(nb, aff[:, i])
        out = acc
    return out


# -- inputs ------------------------------------------------------------------------------------------------------------


def kit_inputs(limit: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, image (1, 3, 320, 320), masks (1, K+1, H, W)) per sample image."""
    from PIL import Image

    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    entries = [(name, e) for group in manifest.values() for name, e in group.items()][:limit]
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, e in entries:
        rgb = np.asarray(Image.open(SAMPLE / e["image"]).convert("RGB"))
        x = torch.from_numpy(((rgb - np.array(MEAN)) / np.array(STD)).astype(np.float32).transpose(2, 0, 1).copy())
        x = F.interpolate(x[None], size=(320, 320), mode="bilinear", align_corners=False)
        size = tuple(e["size_hw"])
        golden = GOLDEN / f"{name}.npz"
        if golden.is_file():
            refined = torch.from_numpy(np.load(golden)["refined_static"])
            masks = labels_from_cams(refined, x[0], size, use_par=False)[0][None]
        else:
            masks = torch.rand(1, 3, *size, generator=gen).softmax(1)
        out.append((name, x, masks.contiguous()))
    return out


def compare_bands(inputs, rounds: int) -> None:
    """The C kernels at 1 vs 2 threads on one image, interleaved; prints the iterations' times and their ratio."""
    lib = native.par_library()
    if lib is None:
        raise SystemExit("the native PAR kernels are not available here")
    offs = _neighbour_offsets(PAR_DILATIONS)
    pos = _positional_affinity(offs, 0.3, 0.01, torch.float32)

    def run(x, m, iters, threads):
        img = F.interpolate(x, size=m.shape[-2:], mode="bilinear", align_corners=True)
        return native.par_cpu(img, m, [(dy, dx) for dy, dx, _ in offs], pos, 0.3, iters, lib, threads=threads)

    same = all(torch.equal(run(x, m, 20, 1), run(x, m, 20, 2)) for _, x, m in inputs)  # also the warm-up
    settings = [(iters, threads) for threads in (1, 2) for iters in (21, 1)]
    ratios = []
    for r in range(rounds):
        t = dict.fromkeys(settings, 0.0)
        for _, x, m in inputs:
            for key in settings:
                t0 = time.perf_counter()
                run(x, m, *key)
                t[key] += time.perf_counter() - t0
        ms = {key: v / len(inputs) * 1e3 for key, v in t.items()}
        it1, it2 = ms[21, 1] - ms[1, 1], ms[21, 2] - ms[1, 2]
        ratios.append(it1 / it2)
        print(f"round {r}: 1 thread {ms[21, 1]:6.1f} ms/image (20 iterations {it1:5.1f})   2 threads "
              f"{ms[21, 2]:6.1f} ms/image (20 iterations {it2:5.1f})   iterations 1/2 threads {ratios[-1]:.2f}",
              flush=True)
    print(f"outputs at 1 and 2 threads bit-identical: {same}")
    print(f"iterations 1/2 threads over {rounds} rounds: median {statistics.median(ratios):.2f}, "
          f"spread {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"iterations 1/2 threads: {statistics.median(ratios):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--images", type=int, default=19)
    ap.add_argument("--backend", default="native", choices=("native", "auto", "torch"),
                    help="backend of the 'native' side (default: the C kernels, failing if they cannot be built)")
    ap.add_argument("--bands", action="store_true", help="the C kernels at 1 vs 2 threads on one image instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inputs = kit_inputs(args.images)
    sizes = sorted({(tuple(m.shape[-2:]), m.shape[1]) for _, _, m in inputs})
    print(f"{len(inputs)} images, (H, W) × channels: {sizes}; torch threads {torch.get_num_threads()}")
    if args.bands:
        compare_bands(inputs, args.rounds)
        return

    sides = {"old": old_par, "torch": lambda x, m: par(x, m, backend="torch"),
             "native": lambda x, m: par(x, m, backend=args.backend)}
    worst, flips = {"old": 0.0, "torch": 0.0}, {"old": 0, "torch": 0}
    for _, x, m in inputs:  # warm-up (builds the native kernels) and output check against the native side
        b = sides["native"](x, m)
        for name in ("old", "torch"):
            a = sides[name](x, m)
            worst[name] = max(worst[name], float((a - b).abs().max()))
            flips[name] += int((a.argmax(1) != b.argmax(1)).sum())
    ratios: dict[str, list[float]] = {"old": [], "torch": []}
    for r in range(args.rounds):
        t = dict.fromkeys(sides, 0.0)
        for _, x, m in inputs:
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn(x, m)
                t[name] += time.perf_counter() - t0
        for name, values in ratios.items():
            values.append(t[name] / t["native"])
        print(f"round {r}: " + "   ".join(f"{k} {v / len(inputs) * 1e3:6.1f} ms/image" for k, v in t.items())
              + f"   old/native {ratios['old'][-1]:.2f}   torch/native {ratios['torch'][-1]:.2f}", flush=True)
    for name, values in ratios.items():
        print(f"outputs: max |{name} - native| {worst[name]:.2e}, argmax differs at {flips[name]} pixels")
        print(f"{name}/native over {args.rounds} rounds: median {statistics.median(values):.2f}, "
              f"spread {min(values):.2f}-{max(values):.2f}")
    print(f"par speed-up: {statistics.median(ratios['old']):.2f}")

if __name__ == "__main__":
    main()
