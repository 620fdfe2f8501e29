"""The paper's ablation (Table 4) on held-out synthetic scenes, with the shipped synthetic CLIP and heads (offline).

    python benchmarks/synthetic_ablation.py [--scenes 500] [--clusters 48] [--heads PATH]

Rows in the order of the paper's Table 4, each scored on the same held-out scenes (the first ``--scenes`` of
``HELD_OUT_SEED``: the ``test`` split of ``--dataset synthetic``):

1. plain CLIP CAM (no SVC, no TSE, no refinement);
2. + SVC (static calibration on the last 5 blocks, §3.2);
3. + TSE (attribute-enriched text, §3.1);
4. + refinement and PAR: the full training-free ExCEL seeds (§3.3 steps 1–2, as ``excelseg cam``);
5. trained LVC pseudo-labels: the adapter's shift of the SVC path (§3.3, Eq. 9) with the P-guided refinement,
   from the shipped heads (what the heads learn from after ``lvc_switch_iter``), next to the static
   pseudo-labels made by the same code path (the trainer's validation);
6. trained decoder: the shipped segmenter's prediction (no image-level labels used; multi-scale + flip).

Rows 1–5 are CAM-seed mIoU (pseudo-labels made with the image-level labels, as the paper scores seeds); row 6 is
segmentation mIoU. Then the SVC-block sweep (last 1 / 3 / 5 / all blocks, with TSE, without and with the
refinement) and plain CLIP with the refinement (the baseline of ``excelseg demo``). Prints one table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from excelseg.bank import bank_for
from excelseg.config import load_config
from excelseg.data.synthetic import TEST_SCENES
from excelseg.knowledge import parse_knowledge
from excelseg.predictor import CamPredictor
from excelseg.synthetic import held_out_samples, synthetic_vocabulary
from excelseg.synthetic.knowledge import SYNTHETIC_CLUSTERS, knowledge_base
from excelseg.synthetic.seeds import pseudo_label_miou, seed_miou, segmenter_miou
from excelseg.synthetic.trained import load_trained
from excelseg.weights import load_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=TEST_SCENES)
    ap.add_argument("--clusters", type=int, default=SYNTHETIC_CLUSTERS,
                    help="TSE attributes B built from the synthetic knowledge")
    ap.add_argument("--heads", default=None, help="trained heads (default: the shipped synthetic heads)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    clip = load_clip("synthetic")
    size = clip.image_size
    vocab = synthetic_vocabulary()
    base = load_config(clip.default_config)
    bank = bank_for(clip, parse_knowledge(knowledge_base(), "synthetic knowledge"), args.clusters,
                    prefix=base.text.template, progress=False)
    blocks = len(clip.model.visual.transformer.resblocks)
    svc = base.cam.svc_last_blocks

    def cfg(svc_blocks: int, refine: bool, par: bool):
        return base.with_(cam=replace(base.cam, svc_last_blocks=svc_blocks),
                          refine=replace(base.refine, refine=refine, use_par=par))

    def samples():
        return held_out_samples(args.scenes, size[0])

    print(f"synthetic CLIP {clip.identity[:19]}…, {blocks} blocks, input {size[0]}x{size[1]}, "
          f"{args.scenes} held-out scenes, B = {args.clusters}")
    print(f"{'setting (paper Table 4 order)':56s} {'mIoU':>6s} {'time':>7s}")

    def row(name: str, score) -> None:
        t0 = time.perf_counter()
        res = score()
        print(f"{name:56s} {100 * res['miou']:5.1f}% {time.perf_counter() - t0:6.1f}s", flush=True)

    def seeds(svc_blocks: int, tse: bool, refine: bool, par: bool):
        predictor = CamPredictor(clip, bank=bank if tse else None, config=cfg(svc_blocks, refine, par), device="cpu")
        return lambda: seed_miou(predictor, samples(), vocab)

    row("1 plain CLIP CAM", seeds(0, False, False, False))
    row(f"2 + SVC (last {svc} blocks)", seeds(svc, False, False, False))
    row("3 + SVC + TSE", seeds(svc, True, False, False))
    row("4 + SVC + TSE + refinement + PAR (training-free ExCEL)", seeds(svc, True, True, True))
    trained = load_trained(clip, args.heads)
    model = trained["model"]
    row("  static pseudo-labels, trainer's code path", lambda: pseudo_label_miou(model, samples(), vocab, lvc=False))
    row("5 trained LVC pseudo-labels (P-guided refinement)",
        lambda: pseudo_label_miou(model, samples(), vocab, lvc=True))
    row("6 trained decoder (segmentation, no image labels)",
        lambda: segmenter_miou(trained["segmenter"], samples(), vocab))
    print("SVC blocks (with TSE)")
    for n in sorted({1, 3, svc, blocks}):
        row(f"  SVC last {n} block{'s' if n > 1 else ''} + TSE", seeds(n, True, False, False))
        row(f"  SVC last {n} block{'s' if n > 1 else ''} + TSE + refinement + PAR", seeds(n, True, True, True))
    row("plain CLIP CAM + refinement + PAR (the demo's baseline)", seeds(0, False, True, True))


if __name__ == "__main__":
    main()
