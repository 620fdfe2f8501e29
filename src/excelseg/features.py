"""``dense_features``: CLIP's L2-normalised patch features under any last-block attention (docs/attention-modes.md).

One call gives the per-patch features that training-free segmentation methods align with text: ExCEL's SVC (the
paper's dual path) or the last-block attention of MaskCLIP, SCLIP, ClearCLIP, NACLIP, or plain CLIP (``none``), each
with its authors' preprocessing by default. The forward is :meth:`excelseg.model.ExcelModel.dense` (the one
preamble every client uses); this module only prepares the inputs and groups modes that can share a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ATTENTION_MODES, load_config
from .io.images import to_rgb_array
from .model import ExcelModel
from .preprocess import Normalization, network_input

__all__ = ["dense_features"]


def _as_model(clip, size: tuple[int, int], device) -> ExcelModel:
    if isinstance(clip, ExcelModel):
        return clip
    from .weights import LoadedClip, load_clip

    loaded = clip if isinstance(clip, LoadedClip) else load_clip(clip, device=device or "cpu")
    cfg = load_config(loaded.default_config or "voc")
    cfg = cfg.with_(cam=replace(cfg.cam, size=tuple(size)))
    model = ExcelModel(loaded.model.visual, config=cfg, clip=loaded)
    return model.to(device) if device is not None else model


def _as_images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [to_rgb_array(im) for im in images]
    if isinstance(images, (list, tuple)):
        return [to_rgb_array(im) for im in images]
    return [to_rgb_array(images)]


@torch.no_grad()
def dense_features(clip, images, *, attention: str | Sequence[str] = "svc", size: int | Sequence[int] = 448,
                   normalization: Normalization | None = None, device=None, batch_size: int = 8
                   ) -> Tensor | dict[str, Tensor]:
    """(B, N, E) L2-normalised patch features (CLS dropped, patches row-major over the size/patch grid) after the
    last block of ``attention``, ``ln_post`` and the projection.

    Args:
        clip: a :class:`~excelseg.weights.LoadedClip`, a :func:`~excelseg.weights.load_clip` spec, or a built
            :class:`~excelseg.model.ExcelModel` (its SVC settings and positional-embedding path are used).
        images: one image or a list (PIL in any mode, numpy (H, W[, C]) arrays, or one (B, H, W, C) array).
        attention: ``svc`` (ExCEL), ``maskclip``, ``sclip``, ``clearclip``, ``naclip`` or ``none`` (plain CLIP);
            a list of them returns ``{mode: features}``, the non-svc modes sharing one pass of the earlier blocks.
        size: N or (H, W): every image is resized to it (bilinear, aspect not kept).
        normalization: ``None``: each mode's own input — for the peers their authors' (CLIP constants as their
            mmseg configs round them, float64 resize, bicubic positional embedding with their scale factor), for
            svc ExCEL's (``cam.normalization``, bilinear positional embedding); a name (``imagenet``, ``clip``,
            ``clip-mmseg``) or a (mean, std) pair in 0–255 space: that normalisation with ExCEL's resize and
            positional embedding for every mode.
        device: where a model built here runs (default cpu); batch_size: images per forward.
    """
    modes = [attention] if isinstance(attention, str) else list(attention)
    bad = [m for m in modes if m not in ATTENTION_MODES]
    if bad or not modes:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {bad or modes}")
    size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    model = _as_model(clip, size, device)
    model._check_size(size)
    rgbs = _as_images(images)
    groups: dict[str, list[str]] = {}  # modes with the same input share a pass
    for m in dict.fromkeys(modes):
        groups.setdefault("svc" if m == "svc" else "own" if normalization is None else "given", []).append(m)
    out: dict[str, list[Tensor]] = {m: [] for m in modes}
    for start in range(0, len(rgbs), batch_size):
        chunk = rgbs[start:start + batch_size]
        for key, group in groups.items():
            own = key == "own"
            norm = normalization if normalization is not None else model.normalization(own)
            x = torch.stack([network_input(rgb, size, norm, exact=own) for rgb in chunk]).to(model.device)
            first, rest = group[0], group[1:]
            res = model.dense(x, attention=first, own_input=own, cache=bool(rest))
            out[first].append(res.features[:, 1:])
            for m in rest:  # the other modes re-run only their last block from the shared cache
                feats, _ = model.encoder.calibrate(replace(res.cache, attention=m))
                out[m].append(feats[:, 1:])
    result = {m: F.normalize(torch.cat(v).float(), dim=-1) for m, v in out.items()}
    return result[attention] if isinstance(attention, str) else result
