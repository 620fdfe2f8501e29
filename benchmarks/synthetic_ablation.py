"""The paper's ablation rows on held-out synthetic scenes, with the shipped synthetic CLIP (offline).

    python benchmarks/synthetic_ablation.py [--scenes 500] [--clusters 48]

CAM-seed mIoU (pseudo-labels computed with the image-level labels, as the paper scores seeds) for: plain CLIP
CAM, +SVC, +SVC+TSE, SVC on the last block only vs the last 3 / 5 blocks, and each with and without the
refinement (attention affinity + box mask) and PAR. Prints one table; the figures are whatever they are.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from excelseg.bank import bank_for
from excelseg.config import load_config
from excelseg.knowledge import parse_knowledge
from excelseg.predictor import CamPredictor
from excelseg.synthetic import (
    held_out_samples,
    knowledge_base,
    synthetic_vocabulary,
)
from excelseg.synthetic.seeds import seed_miou
from excelseg.weights import load_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--clusters", type=int, default=48, help="TSE attributes B built from the synthetic knowledge")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clip = load_clip("synthetic")
    size = clip.image_size
    vocab = synthetic_vocabulary()
    kb = parse_knowledge(knowledge_base(), "synthetic knowledge")
    base = load_config("synthetic")
    bank = bank_for(clip, kb, args.clusters, prefix=base.text.template, progress=False)
    blocks = len(clip.model.visual.transformer.resblocks)

    def cfg(svc: int, refine: bool, par: bool):
        return base.with_(cam=replace(base.cam, svc_last_blocks=svc),
                          refine=replace(base.refine, refine=refine, use_par=par))

    rows = [
        ("plain CLIP CAM", 0, False, False, False),
        ("+ SVC (last 5 blocks)", 5, False, False, False),
        ("+ SVC + TSE", 5, True, False, False),
        ("SVC last 1 block + TSE", 1, True, False, False),
        ("SVC last 3 blocks + TSE", 3, True, False, False),
        (f"SVC last {blocks} blocks + TSE", blocks, True, False, False),
        ("plain CLIP CAM + refine + PAR", 0, False, True, True),
        ("+ SVC + refine", 5, False, True, False),
        ("+ SVC + TSE + refine", 5, True, True, False),
        ("+ SVC + TSE + refine + PAR (full ExCEL)", 5, True, True, True),
    ]
    print(f"synthetic CLIP {clip.identity[:19]}…, {blocks} blocks, input {size[0]}x{size[1]}, "
          f"{args.scenes} held-out scenes, B = {args.clusters}")
    print(f"{'setting':44s} {'seed mIoU':>9s} {'time':>7s}")
    for name, svc, tse, refine, par in rows:
        predictor = CamPredictor(clip, bank=bank if tse else None, config=cfg(svc, refine, par), device="cpu")
        t0 = time.perf_counter()
        res = seed_miou(predictor, held_out_samples(args.scenes, size[0]), vocab)
        print(f"{name:44s} {100 * res['miou']:8.1f}% {time.perf_counter() - t0:6.1f}s")


if __name__ == "__main__":
    main()
