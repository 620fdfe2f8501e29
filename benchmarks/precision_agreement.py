"""Pixel agreement of pseudo-labels computed with a mixed-precision CLIP forward against fp32, on the parity kit.

    python benchmarks/precision_agreement.py [--precision bf16] [--device cpu]

Uses the kit's random ViT-B/16 (``../shared/parity/make_random_clip.py --seed 0``, as the parity tests do), the
reference bank and the paper's VOC settings, on the 19 sample images. Prints, per image and overall, the share of
pixels whose label equals the fp32 label, and the largest CAM difference. (Random weights: real weights may agree
more or less; the number bounds the effect of the precision on the refinement chain, not on quality.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from excelseg import CamPredictor, load_clip
    from excelseg.io.images import read_image, to_rgb_array
    from parity_kit import REF_BANK, golden, image_names, image_path, random_clip_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=19)
    args = ap.parse_args()
    clip = load_clip(random_clip_weights(), device=args.device)
    ref = CamPredictor(clip, vocabulary="voc", bank=REF_BANK, device=args.device)
    low = CamPredictor(clip, vocabulary="voc", bank=REF_BANK, device=args.device, precision=args.precision)
    agree, total, worst_cam = 0, 0, 0.0
    for name in image_names()[: args.images]:
        rgb = to_rgb_array(read_image(image_path(name)))
        classes = [ref.vocabulary.names[i] for i in golden(name)["cls_idx"]]
        a = ref.set_image(rgb).predict(classes)
        b = low.set_image(rgb).predict(classes)
        same = int((a.pseudo_label == b.pseudo_label).sum())
        agree, total = agree + same, total + a.pseudo_label.size
        cam_diff = float(np.abs(a.raw_cams - b.raw_cams).max())
        worst_cam = max(worst_cam, cam_diff)
        print(f"{name}  agreement {100 * same / a.pseudo_label.size:7.3f} %   max |Δ raw CAM| {cam_diff:.4f}", flush=True)
    print(f"{args.precision} vs fp32 on {args.device}: pixel agreement {100 * agree / total:.3f} % over "
          f"{min(args.images, len(image_names()))} images; max |Δ raw CAM| {worst_cam:.4f}")


if __name__ == "__main__":
    main()
