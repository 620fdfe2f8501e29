"""Segmentation with trained heads: multi-scale + flip inference (EXCEL_SPEC §6; parity README §3.3 "msc", §5.10).

:class:`Segmenter` is the façade: ``Segmenter.from_checkpoint(ckpt).predict(image)`` → :class:`SegResult`. Per
scale ``s`` of ``config.segment.scales`` the image is resized to a square ``int(cam.size · s)`` input (aspect not
kept, as the reference), run once through the frozen CLIP (per-layer tokens for the adapter; the SVC blocks only
when the adapter reads the aliased slots, ``heads.alias_features``) and through the heads (adapter → decoder) to
patch-grid logits. With ``segment.flip`` the mirrored input is run in the same batch and its logits flipped back
and averaged with the plain ones; ``segment.skip_flip_at_base`` reproduces ``infer_seg_voc.py``, which computes
and discards the flip at scale 1.0 (here it is not computed at all; ``infer_seg_coco.py`` flips every scale).
Each scale's logits are bilinearly upsampled to the output size and averaged over scales (logits, not
probabilities); the label is their argmax, optionally after a dense CRF (:mod:`excelseg.crf`).

The output size is the image size; with ``segment.logits_scale`` < 1 (COCO reference: 0.2) the logits are
aggregated and kept at that fraction of it, and upsampled to the image size for the argmax / CRF only. Logits are
aggregated at most :data:`MAX_WORK_SIDE` pixels on the longer side and the label of a larger image is the argmax
of their bilinear upsampling, computed in blocks of rows (:func:`upsampled_argmax`), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PipelineConfig, load_config
from .devices import resolve_device
from .heads import ExcelHeads
from .io.images import to_rgb_array
from .model import ExcelModel, model_attribute, multiscale_views
from .vocab import Vocabulary
from .weights import LoadedClip, load_clip

__all__ = ["MAX_WORK_SIDE", "SegResult", "Segmenter", "aggregate_logits", "logits_size", "upsampled_argmax"]

MAX_WORK_SIDE = 2048  # logits are aggregated at most this large (longer side); bigger labels are upsampled
CHUNK_ELEMENTS = 1 << 24  # upsampled logits are materialised at most this many floats at a time (64 MB)


@dataclass
class SegResult:
    """Segmentation of one image; C = number of classes, label values 0 = background, i + 1 = class i."""

    class_names: list[str]
    image_size: tuple[int, int]  # (H, W)
    label: np.ndarray  # (H, W) uint8 argmax of the aggregated logits (after the CRF when one was run)
    logits: Tensor  # (C + 1, h', w') aggregated logits: image size, or × segment.logits_scale
    label_single_scale: np.ndarray | None = None  # (H, W) uint8 from the scale-1.0 plain logits alone
    label_no_crf: np.ndarray | None = None  # (H, W) uint8 before the CRF (only when a CRF was run)


def logits_size(image_size: tuple[int, int], scale: float = 1.0) -> tuple[int, int]:
    """Size the logits are aggregated at: ``image_size · scale`` (rounded, ≥ 1), longer side ≤ MAX_WORK_SIDE."""
    h, w = (max(1, round(s * scale)) for s in image_size)
    f = min(1.0, MAX_WORK_SIDE / max(h, w))
    return (max(1, round(h * f)), max(1, round(w * f))) if f < 1 else (h, w)


def aggregate_logits(per_scale: Sequence[tuple[Tensor, Tensor | None]], size: tuple[int, int]) -> Tensor:
    """Multi-scale logits → (C, H, W) at ``size`` (EXCEL_SPEC §6).

    Args:
        per_scale: per scale ``(logits, flipped)``: (C, h, w) logits of the input and (C, h, w) logits of the
            mirrored input *in mirrored coordinates*, or None when that scale is not flipped.
        size: output (H, W).

    Returns:
        mean over scales of ``up(logits)`` (or ``(up(logits) + mirror(up(flipped))) / 2``), ``up`` = bilinear,
        align_corners=False.
    """
    total = None
    for logits, flipped in per_scale:
        x = logits[None] if flipped is None else torch.stack([logits, flipped])
        up = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        agg = up[0] if flipped is None else (up[0] + up[1].flip(-1)) / 2
        total = agg if total is None else total + agg
    if total is None:
        raise ValueError("no scales to aggregate")
    return total / len(per_scale)


def upsampled_argmax(logits: Tensor, size: tuple[int, int], chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``argmax`` over classes of the (C, h, w) ``logits`` bilinearly upsampled (align_corners=False) to
    ``size``, without holding more than about ``chunk_elements`` upsampled values: the interpolation is
    separable, so the width is upsampled once and the height block by block of output rows. (H, W) int64."""
    c, h, w = logits.shape
    out_h, out_w = size
    if c * out_h * out_w <= chunk_elements:
        up = logits if (h, w) == tuple(size) else F.interpolate(logits[None], size=tuple(size), mode="bilinear",
                                                                align_corners=False)[0]
        return up.argmax(0)
    wide = F.interpolate(logits[None], size=(h, out_w), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    label = torch.empty(out_h, out_w, dtype=torch.long, device=logits.device)
    rows = max(1, chunk_elements // (c * out_w))
    for start in range(0, out_h, rows):
        i = torch.arange(start, min(out_h, start + rows), dtype=torch.float64, device=logits.device)
        src = ((i + 0.5) * (h / out_h) - 0.5).clamp(min=0)
        y0 = src.floor().long().clamp(max=h - 1)
        dy = (src - y0).to(logits.dtype)[None, :, None]
        block = wide[:, y0] * (1 - dy) + wide[:, (y0 + 1).clamp(max=h - 1)] * dy
        label[start:start + len(i)] = block.argmax(0)
    return label


class Segmenter:
    """Trained ExCEL segmenter: a façade over an :class:`~excelseg.model.ExcelModel` with trained heads
    (multi-scale + flip decoder logits, optional CRF; EXCEL_SPEC §6).

    ``Segmenter(model)`` takes a built model (:func:`excelseg.build_model` with a checkpoint);
    ``Segmenter(clip, heads, class_names, config=..., device=...)`` assembles one from loaded parts, and
    :meth:`from_checkpoint` loads one.

    Args:
        clip: a built :class:`~excelseg.model.ExcelModel`, or a :class:`~excelseg.weights.LoadedClip` / a spec for
            :func:`~excelseg.weights.load_clip`.
        heads: the trained :class:`~excelseg.heads.ExcelHeads` (put in eval mode).
        class_names: the C foreground classes, label ``i + 1`` = ``class_names[i]``.
        config: settings (``cam.size`` = base size, ``cam.normalization``, ``cam.pos_two_step``, ``heads``,
            ``segment``); a config, shipped name or YAML path; default ``"voc"``.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``/``None``.
    """

    def __init__(self, clip, heads: ExcelHeads | None = None, class_names: Sequence[str] | None = None, *,
                 config: PipelineConfig | str | None = None, device: str | torch.device | None = None):
        if isinstance(clip, ExcelModel):
            model = clip
            if model.heads is None:
                raise ValueError("a Segmenter needs a model with trained heads (build_model(checkpoint=...))")
            names = class_names if class_names is not None else model.vocabulary.names
        else:
            if heads is None or class_names is None:
                raise TypeError("Segmenter(clip, heads, class_names) needs the heads and their class names")
            device = resolve_device(device)
            clip = clip if isinstance(clip, LoadedClip) else load_clip(clip, device=device)
            clip.model.to(device)
            cfg = load_config(config)
            if heads.decoder.num_outputs != len(class_names) + 1:
                raise ValueError(f"the heads predict {heads.decoder.num_outputs} outputs for "
                                 f"{len(class_names)} classes (expected classes + background)")
            model = ExcelModel(clip.model.visual, config=cfg, heads=heads.to(device).eval(), clip=clip,
                               vocabulary=Vocabulary.from_names(class_names)).to(device)
            names = class_names
        self.model = model
        self.class_names = [str(n) for n in names]
        if model.heads.decoder.num_outputs != len(self.class_names) + 1:
            raise ValueError(f"the heads predict {model.heads.decoder.num_outputs} outputs for "
                             f"{len(self.class_names)} classes (expected classes + background)")
        model.heads.eval()

    @classmethod
    def from_checkpoint(cls, checkpoint, clip: LoadedClip | str | Path | None = None, *,
                        config: PipelineConfig | str | None = None, class_names: Sequence[str] | None = None,
                        device: str | torch.device | None = None) -> Segmenter:
        """A segmenter from an excelseg checkpoint (:func:`~excelseg.interop.save_checkpoint`).

        ``clip``: default the weights the checkpoint records when they are an open_clip tag or shipped with
        excelseg (``synthetic``); a checkpoint made with other CLIP weights, or for other ``class_names`` (when
        given), is refused saying which.
        ``config``: default the settings stored in the checkpoint.
        """
        from .build import build_model

        return cls(build_model(clip, checkpoint=checkpoint, config=config, device=device,
                               vocabulary=None if class_names is None else list(class_names)))

    config = model_attribute("config")
    device = model_attribute("device")
    clip = model_attribute("clip")
    heads = model_attribute("heads")

    # ---- logits -----------------------------------------------------------------------------------------------
    def head_logits(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) normalised inputs → (B, C + 1, h/16, w/16) decoder logits (one frozen CLIP pass)."""
        return self.model.decoder_logits(x)

    def _views(self) -> list[tuple[float, bool]]:
        seg = self.config.segment
        return multiscale_views(seg.scales, seg.flip, seg.skip_flip_at_base)

    def scale_logits(self, rgbs: Sequence[np.ndarray]) -> list[list[tuple[Tensor, Tensor | None]]]:
        """Per image, per scale ``(logits, flipped logits or None)`` on the patch grid (one forward per scale for
        the whole batch, mirrored inputs included)."""
        return self.model.multiscale_logits(rgbs, self._views())

    # ---- prediction -------------------------------------------------------------------------------------------
    def predict(self, image, *, crf: bool | None = None, single_scale: bool = False) -> SegResult:
        """Segment one image (PIL image in any mode, or numpy (H, W[, C]) array).

        ``crf``: run the dense CRF (default ``config.segment.crf``); ``single_scale``: also return the label of
        the scale-1.0 plain logits alone (``label_single_scale``; free, those logits are computed anyway).
        """
        return self.predict_batch([image], crf=crf, single_scale=single_scale)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence, *, crf: bool | None = None, single_scale: bool = False
                      ) -> list[SegResult]:
        """:meth:`predict` for several images, batched per scale."""
        crf = self.config.segment.crf if crf is None else crf
        if crf:
            from .crf import require_crf

            require_crf()
        rgbs = [to_rgb_array(im) for im in images]
        return [self._finish(rgb, per_scale, crf, single_scale)
                for rgb, per_scale in zip(rgbs, self.scale_logits(rgbs))]

    def _finish(self, rgb: np.ndarray, per_scale, crf: bool, single_scale: bool) -> SegResult:
        size = tuple(rgb.shape[:2])
        work = logits_size(size, self.config.segment.logits_scale)
        logits = aggregate_logits(per_scale, work)
        label = upsampled_argmax(logits, size).to(torch.uint8).cpu().numpy()
        ss = None
        if single_scale:
            scales = [s for s, _ in self._views()]
            base = scales.index(1.0) if 1.0 in scales else 0
            ss = upsampled_argmax(per_scale[base][0], size).to(torch.uint8).cpu().numpy()
        no_crf = None
        if crf:  # the CRF needs the full-size probabilities anyway
            from .crf import dense_crf

            full = logits if work == size else F.interpolate(logits[None], size=size, mode="bilinear",
                                                             align_corners=False)[0]
            probs = torch.softmax(full, dim=0).cpu().numpy()
            no_crf, label = label, dense_crf(rgb, probs).argmax(0).astype(np.uint8)
        return SegResult(list(self.class_names), size, label, logits.cpu(), ss, no_crf)
