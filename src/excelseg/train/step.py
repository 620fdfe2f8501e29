"""One ExCEL training step as a function of the model, a batch and the iteration (EXCEL_SPEC §5.2–§5.3, §10.7,
§10.9): the library half of training. The trainer (:mod:`excelseg.train.trainer`) adds the loop, optimiser,
AMP, DDP, checkpoints and logs around :func:`training_losses`.

Per batch (``n_iter`` = 0-based iteration):

1. one frozen CLIP pass + heads (:meth:`ExcelModel.forward`);
2. CAMs: static before ``lvc_switch_iter``, afterwards LVC CAMs from the cached SVC stream shifted by the adapter
   features (detached);
3. refinement: attention affinity (static), or P-guided after the switch; box mask τ_box
   (``heads.train_box_threshold``: 0.79 VOC, 0.88 COCO) over each image's present classes; PAR on the
   de-normalised crop (``uint8(x·std + mean) / 255``, as the reference) — batched on the device
   (:meth:`ExcelModel.pseudo_labels`);
4. ``L_seg`` on the pseudo-labels; ``L_div`` on ``P`` with targets from the pseudo-labels, or (from
   ``self_affinity_iter``, VOC) from the model's own argmax prediction at crop size;
5. ``L = L_seg + div_weight · L_div``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..losses import affinity_labels, affinity_loss, balanced_seg_loss, excel_loss
from ..model import ExcelModel, ExcelOutput
from ..preprocess import denormalize_uint8

__all__ = ["StepLosses", "check_batch", "training_losses", "uses_lvc", "uses_self_affinity"]


@dataclass
class StepLosses:
    loss: Tensor  # 0-d total (with gradient)
    loss_seg: Tensor
    loss_div: Tensor
    pos_count: Tensor  # affinity pairs (+1, as the reference returns them)
    neg_count: Tensor
    pseudo: Tensor  # (B, H, W) uint8 pseudo-labels used for L_seg
    aff_source: Tensor  # (B, H, W) labels the affinity targets came from
    cams: Tensor  # (B, C, h, w) CAMs the pseudo-labels came from
    output: ExcelOutput


def uses_lvc(n_iter: int, cfg: TrainConfig) -> bool:
    """LVC CAMs and P-guided refinement at this iteration (reference: ``n_iter >= 14000`` VOC, 30000 COCO)."""
    return cfg.lvc_switch_iter >= 0 and n_iter >= cfg.lvc_switch_iter


def uses_self_affinity(n_iter: int, cfg: TrainConfig) -> bool:
    """``L_div`` targets from the model's own prediction (reference VOC: ``n_iter >= 24000``; COCO never)."""
    return cfg.self_affinity_iter >= 0 and n_iter >= cfg.self_affinity_iter


def check_batch(images: Tensor, cls_labels: Tensor, model: ExcelModel) -> None:
    """Shapes a training step can use, as one-line errors (a crop smaller than one patch, label width)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    ph, pw = model.encoder.patch_size
    if images.shape[-2] < ph or images.shape[-1] < pw:
        raise ValueError(f"crop {images.shape[-2]}x{images.shape[-1]} is smaller than one {ph}x{pw} patch; "
                         f"use train.crop_size >= {max(ph, pw)}")
    if cls_labels.shape != (images.shape[0], model.num_classes):
        raise ValueError(f"image-level labels must be (B, {model.num_classes}), got {tuple(cls_labels.shape)}")


def training_losses(model: ExcelModel, images: Tensor, cls_labels: Tensor, n_iter: int, cfg: TrainConfig,
                    out: ExcelOutput | None = None, pseudo: Tensor | None = None) -> StepLosses:
    """Losses of one training step (EXCEL_SPEC §5.2); ``loss.backward()`` reaches only the heads.

    Args:
        model: the model (heads in train mode for dropout; eval mode reproduces the parity kit's steps).
        images: (B, 3, H, W) normalised crops; cls_labels: (B, C) multi-hot image-level labels.
        n_iter: 0-based iteration (selects the static/LVC branch and the affinity target).
        out: a precomputed forward of ``images`` (default: run it here).
        pseudo: (B, H, W) pseudo-labels to use instead of computing them (e.g. precomputed or golden ones);
            ``cams`` of the result is then empty.
    """
    check_batch(images, cls_labels, model)
    if out is None:
        out = model(images)
    size = tuple(images.shape[-2:])
    lvc = uses_lvc(n_iter, cfg)
    if pseudo is None:
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            cams = (model.lvc_cams(out) if lvc else model.static_cams(out)).float()
            trans, _, _ = model.transition(out, guided=lvc)
            par_images = denormalize_uint8(images.float(), model.config.cam.normalization)
            pseudo = model.pseudo_labels(cams, cls_labels, trans.float(), par_images, size)
    else:
        cams = images.new_zeros(0)
    logits = out.seg_logits.float()
    seg = balanced_seg_loss(logits, pseudo)
    if uses_self_affinity(n_iter, cfg):
        with torch.no_grad():
            up = F.interpolate(logits.detach(), size=size, mode="bilinear", align_corners=False)
            source = up.argmax(dim=1).to(torch.uint8)
    else:
        source = pseudo
    aff = affinity_loss(out.affinity.float(), affinity_labels(source.long(), out.grid, cfg.aff_radius))
    total = excel_loss(seg, aff.loss, cfg.div_weight)
    return StepLosses(total, seg, aff.loss, aff.pos_count, aff.neg_count, pseudo, source, cams, out)
