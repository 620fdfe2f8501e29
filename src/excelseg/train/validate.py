"""In-training validation (EXCEL_SPEC §6): pseudo-labels and the decoder's segmentation scored against the masks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PipelineConfig
from ..model import ExcelModel
from .dist import DistInfo

__all__ = ["validate", "validation_tables"]


@torch.no_grad()
def validate(model: ExcelModel, ds, cfg: PipelineConfig, device: torch.device, limit: int = 0,
             dist: DistInfo = DistInfo(), on_image: Callable | None = None):  # noqa: B008 (frozen)
    """The reference's in-training validation (EXCEL_SPEC §6): each image resized to ``cam.size``, one forward;
    (a) pseudo-labels from the static CAMs with P-guided refinement (τ_box ``heads.val_box_threshold``) and PAR at
    label size; (b) the decoder's logits upsampled to label size. Returns the two
    :class:`~excelseg.metrics.SegmentationMetric` (summed over processes)."""
    from ..metrics import SegmentationMetric
    from ..preprocess import network_input

    names = ["background", *ds.class_names]
    pseudo_m, seg_m = SegmentationMetric(len(names), class_names=names), SegmentationMetric(len(names), class_names=names)
    was_training = model.training
    model.eval()
    ids = range(len(ds) if limit <= 0 else min(limit, len(ds)))
    for i in list(ids)[dist.rank::dist.world]:
        s = ds[i]
        x = network_input(s["image"], tuple(cfg.cam.size), cfg.cam.normalization)[None].to(device)
        size = tuple(s["mask"].shape)
        out = model(x)
        label = torch.from_numpy(np.asarray(s["label"]))[None].to(device)
        pseudo = model.labels_from_output(out, x, label, size, lvc=False, guided=True,
                                          box_threshold=cfg.heads.val_box_threshold)[0]
        seg = F.interpolate(out.seg_logits.float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        gt = torch.from_numpy(np.asarray(s["mask"])).to(device)
        pseudo_m.update(pseudo.long(), gt.long())
        seg_m.update(seg, gt.long())
        if on_image is not None:
            on_image(i, s, pseudo.cpu().numpy(), seg.to(torch.uint8).cpu().numpy())
    model.train(was_training)
    return pseudo_m.all_reduce(), seg_m.all_reduce()


def validation_tables(pseudo_m, seg_m, iteration: int) -> str:
    """Per-class IoU of both validations side by side, and their means (as the reference's log tables)."""
    p, s = pseudo_m.compute(), seg_m.compute()

    def pct(v):
        return "  —  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    width = max(len(n) for n in p["class_names"]) + 2
    lines = [f"validation @ iteration {iteration}", f"{'class':<{width}} {'pseudo':>7} {'seg':>7}"]
    for name, a, b in zip(p["class_names"], p["iou"], s["iou"]):
        lines.append(f"{name:<{width}} {pct(a):>7} {pct(b):>7}")
    lines.append(f"{'mIoU':<{width}} {pct(p['miou']):>7} {pct(s['miou']):>7}")
    lines.append(f"{'mean (all)':<{width}} {pct(p['mean_all_classes']):>7} {pct(s['mean_all_classes']):>7}")
    return "\n".join(lines)
