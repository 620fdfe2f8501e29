"""Training-free dense CLIP methods as WSSS seed generators under one protocol, in the synthetic world (issue 23).

    python benchmarks/attention_modes.py [--scenes 500] [--threads 1] [--rounds 15] [--vit-rounds 5]

Every last-block attention of ``cam.attention`` — ExCEL's SVC (the paper's), MaskCLIP, SCLIP, ClearCLIP, NACLIP
and plain CLIP (``none``) — on the same held-out synthetic scenes (the first ``--scenes`` of ``HELD_OUT_SEED``)
with the shipped synthetic CLIP, its TSE bank (``synthetic_bank``) and the synthetic settings (96 px input, 12×12
grid). Seed mIoU as :func:`excelseg.synthetic.seeds.seed_miou` scores it (pseudo-labels made with the image-level
labels, pooled mIoU over present classes):

* ``CAM``: the mode's CAMs → labels directly (``refine.refine=false``: no affinity, box mask or PAR);
* ``+ refine``: the same CAMs through ExCEL's refinement (attention affinity, box mask, PAR), as ``excelseg cam``.

For the four peers and plain CLIP each with ``cam.attention_input=own`` (their authors' input: CLIP's constants as their mmseg
configs round them, float64 resize, bicubic positional embedding; the default) and ``pipeline`` (ExCEL's input:
the weights' ImageNet constants and bilinear positional embedding, which this CLIP was trained with).

Speed: the dense forward per image of each mode relative to the bare forward (plain CLIP, no attention maps, no
tokens kept), timed interleaved: every round runs each variant once, in a shuffled order, and gives one ratio per
mode (its time / the bare forward's time in that round); printed: the median over ``--rounds`` and the spread
(min–max). On the synthetic CLIP (batch of 16 scenes at 96 px) and on a ViT-B/16 geometry (open_clip's random
initialisation, no download; one image at 448 px; ``--vit-rounds``, 0 skips it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

import torch

from excelseg.config import ATTENTION_MODES, load_config
from excelseg.model import ExcelModel
from excelseg.predictor import CamPredictor
from excelseg.preprocess import network_input
from excelseg.synthetic import held_out_samples, synthetic_vocabulary
from excelseg.synthetic.knowledge import synthetic_bank
from excelseg.synthetic.seeds import seed_miou
from excelseg.weights import load_clip

PEERS = [m for m in ATTENTION_MODES if m != "svc"]  # the modes with an input of their own (``none`` included)


def forward_ratios(model: ExcelModel, x: torch.Tensor, rounds: int) -> dict:
    """Per mode (its dense forward with its own input path): (median, min, max) over the rounds of its time / the
    bare forward's time in the same round; ``bare_ms``: the bare forward's median time per image."""
    variants = {"bare": lambda: model.encoder(x, (), (), return_tokens=False)}
    for mode in ATTENTION_MODES:
        variants[mode] = lambda m=mode: model.dense(x, attention=m, own_input=model.own_input(m))
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(0)
    with torch.no_grad():
        for fn in variants.values():  # warm-up (positional-embedding cache, NACLIP's neighbourhood, kernels)
            fn()
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    out: dict = {"bare_ms": 1000 * statistics.median(times["bare"]) / x.shape[0]}
    for m in ATTENTION_MODES:
        ratios = [t / b for t, b in zip(times[m], times["bare"])]
        out[m] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}× ({r[1]:.2f}–{r[2]:.2f})"


def vit_b16_ratios(size: int, rounds: int) -> dict[str, float]:
    import open_clip

    from excelseg.weights import LoadedClip

    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    clip = LoadedClip(model=model, tokenizer=None, name="ViT-B-16 (random init)", identity="random", source="bench",
                      mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    cfg = load_config("voc")
    m = ExcelModel(model.visual, config=cfg.with_(cam=replace(cfg.cam, size=(size, size))), clip=clip)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return forward_ratios(m, x, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds on the synthetic CLIP")
    ap.add_argument("--vit-rounds", type=int, default=5, help="interleaved timing rounds on ViT-B/16 (0: skip)")
    ap.add_argument("--vit-size", type=int, default=448)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    clip = load_clip("synthetic", device="cpu")
    size = clip.image_size
    vocab = synthetic_vocabulary()
    base = load_config(clip.default_config)
    bank = synthetic_bank(clip, template=base.text.template)

    def score(mode: str, attention_input: str, refine: bool) -> float:
        cfg = base.with_(cam=replace(base.cam, attention=mode, attention_input=attention_input),
                         refine=replace(base.refine, refine=refine, use_par=refine))
        predictor = CamPredictor(clip, bank=bank, config=cfg, device="cpu")
        return 100 * seed_miou(predictor, held_out_samples(args.scenes, size[0]), vocab)["miou"]

    print(f"synthetic CLIP {clip.identity[:19]}…, input {size[0]}x{size[1]}, {args.scenes} held-out scenes, TSE on, "
          f"{args.threads} threads")
    model = ExcelModel(clip.model.visual, config=base, clip=clip)
    images = [im for im, _, _ in held_out_samples(16, size[0])]
    x = torch.stack([network_input(im, size, model.normalization()) for im in images])
    speed = forward_ratios(model, x, args.rounds)
    vit = vit_b16_ratios(args.vit_size, args.vit_rounds) if args.vit_rounds else None
    head = f"{'attention':10s} {'input':9s} {'CAM':>6s} {'+ refine':>9s}  {'forward (spread)':19s}"
    if vit:
        head += f" {'ViT-B/16 (spread)':19s}"
    print(head)
    for mode in ATTENTION_MODES:
        for attention_input in (("own", "pipeline") if mode in PEERS else ("—",)):
            t0 = time.perf_counter()
            ai = "own" if attention_input == "—" else attention_input
            cam, refined = score(mode, ai, False), score(mode, ai, True)
            line = f"{mode:10s} {attention_input:9s} {cam:5.1f}% {refined:8.1f}%"
            if attention_input != "pipeline":
                line += f"  {fmt(speed[mode]):19s}" + (f" {fmt(vit[mode]):19s}" if vit else "")
            print(line + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"forward: the mode's dense forward / the bare forward, median over {args.rounds} interleaved rounds "
          f"(bare {speed['bare_ms']:.2f} ms per image on the synthetic CLIP, batch 16)"
          + (f"; ViT-B/16 at {args.vit_size} px, batch 1, {args.vit_rounds} rounds: bare {vit['bare_ms']:.0f} ms"
             if vit else ""))


if __name__ == "__main__":
    main()
