"""Pixel-adaptive refinement (PAR) of class score maps (EXCEL_SPEC §3.4; the reference's ``utils/PAR.py``).

Each pixel's scores are propagated 20 times over 48 dilated neighbours, weighted by a softmax of colour
similarity plus a small positional term. On float32 CPU tensors the fused C kernels of :mod:`excelseg._native`
run instead of the torch implementation (same operations in the same order, so the same bits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native as native

__all__ = ["PAR_DILATIONS", "par"]

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)

# ----------------------------------------------------------------------------------------------------------------
# §3.4 pixel-adaptive refinement
# ----------------------------------------------------------------------------------------------------------------


def _neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int, bool]]:
    """The 8 neighbour offsets ``(dy, dx, diagonal)`` of every dilation, in dilation order."""
    offs = []
    for d in dilations:
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    offs.append((dy, dx, dy != 0 and dx != 0))
    return offs


def _positional_affinity(offs: list[tuple[int, int, bool]], w_color: float, w_pos: float,
                         dtype: torch.dtype) -> list[float]:
    """``w_pos · softmax_n(−(p_n / std(p) / w_color)²)`` per neighbour, computed in ``dtype`` (exact as floats)."""
    pos = torch.tensor([abs(dy) * math.sqrt(2.0) if diag else float(max(abs(dy), abs(dx))) for dy, dx, diag in offs],
                       dtype=dtype)
    return (w_pos * (-(pos / pos.std() / w_color).square()).softmax(dim=0)).tolist()


def _par_affinity(img: Tensor, offs: list[tuple[int, int, bool]], w_color: float, w_pos: float) -> list[Tensor]:
    """Per-pixel PAR neighbour weights.

    Args:
        img: (B, 3, H, W) image already at the mask size.

    Returns:
        one (B, 1, H, W) weight map per neighbour (len(offs) maps); each pixel's weights sum to ``1 + w_pos``. Separate
        maps rather than one (B, Nn, H, W) tensor: a tensor that large is a fresh memory mapping on every call whose
        page faults cost as much as the softmax, while maps of one neighbour are small enough to be reused.
    """
    bsz, _, h, w = img.shape
    nn_ = len(offs)
    pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offs)
    padded = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    nbs = [padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx, _ in offs]

    # unbiased std over the neighbours (two-pass), streamed through one scratch buffer: no per-neighbour allocation
    # and no (B, 3, Nn, H, W) tensor
    mean = nbs[0].clone()
    for nb in nbs[1:]:
        mean.add_(nb)
    mean /= nn_
    tmp = torch.empty_like(img)
    var = torch.zeros_like(img)
    for nb in nbs:
        var.addcmul_(torch.sub(nb, mean, out=tmp), tmp)
    inv = (var / (nn_ - 1)).sqrt_().add_(1e-8).mul_(w_color).reciprocal_()  # 1 / ((std + 1e-8) · w_color)

    # logits −mean_colour ((I_n − I) · inv)², accumulated channel by channel (a dim-1 reduction over 3 channels is
    # slower) and scaled while the neighbour's map is still in cache
    weights = []
    for nb in nbs:
        torch.sub(nb, img, out=tmp).mul_(inv)
        out = torch.mul(tmp[:, 0], tmp[:, 0])
        for c in range(1, img.shape[1]):
            out.addcmul_(tmp[:, c], tmp[:, c])
        weights.append(out.mul_(-1.0 / img.shape[1]).unsqueeze(1))

    pos_aff = _positional_affinity(offs, w_color, w_pos, img.dtype)
    # softmax over the neighbours plus the positional term, in bands of rows that fit in cache, written back over the
    # logits; one scalar add per neighbour (a broadcast (1, Nn, 1, 1) tensor add is several times slower on CPU)
    rows = max(1, (1 << 20) // max(1, bsz * nn_ * w))
    for r in range(0, h, rows):
        band = torch.stack([wt[:, 0, r : r + rows] for wt in weights], dim=1).softmax(dim=1)
        for i, p in enumerate(pos_aff):
            torch.add(band[:, i], p, out=weights[i][:, 0, r : r + rows])
    return weights


def par(
    image: Tensor,
    masks: Tensor,
    iters: int = 20,
    dilations: Sequence[int] = PAR_DILATIONS,
    w_color: float = 0.3,
    w_pos: float = 0.01,
    *,
    backend: str = "auto",
) -> Tensor:
    """Pixel-adaptive refinement (EXCEL_SPEC §3.4).

    The image is bilinearly resized (align_corners=True) to the mask size. Every pixel has 8 neighbours per
    dilation d at offsets (±d, 0), (0, ±d), (±d, ±d), with replicate padding (coordinates clamped to the image).
    Weights: ``softmax_n(mean_rgb −(|I_n − I| / (std_n(I_n) + 1e-8) / w_color)²)
    + w_pos · softmax_n(−(p_n / std(p) / w_color)²)`` with p = d (axis) or d√2 (diagonal) and unbiased stds;
    then ``iters`` steps of ``masks ← Σ_n aff_n · masks_n``.

    Two implementations compute this in the same order of operations and agree to float rounding: fused C kernels
    (:mod:`excelseg._native`, ~3.5× faster; float32 on the CPU, when a C compiler is available) and torch ops (any
    device and dtype). Neither records gradients (PAR makes pseudo-labels, EXCEL_SPEC §3.4, §5.2).

    Args:
        image: (B, 3, Hi, Wi) image (any per-channel affine normalisation; PAR is invariant to it).
        masks: (B, C, H, W) score maps.
        backend: ``"auto"`` (the C kernels when they apply, else torch), ``"native"`` (the C kernels, or an error
            saying why not) or ``"torch"``.

    Returns:
        (B, C, H, W) refined maps (same dtype as ``masks``).
    """
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(f"image (B,3,Hi,Wi) / masks (B,C,H,W) expected, got {image.shape} / {masks.shape}")
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    h, w = masks.shape[-2:]
    if iters <= 0:
        return masks
    img = F.interpolate(image.to(masks), size=(h, w), mode="bilinear", align_corners=True)
    offs = _neighbour_offsets(dilations)
    lib = _native_library(masks, backend)
    if lib is not None:
        pos_aff = _positional_affinity(offs, w_color, w_pos, img.dtype)
        return native.par_cpu(img, masks, [(dy, dx) for dy, dx, _ in offs], pos_aff, w_color, iters, lib)
    weights = _par_affinity(img, offs, w_color, w_pos)  # Nn × (B, 1, H, W)
    # ``iters`` applications of one fixed linear operator. Two padded buffers are reused across iterations: each
    # step writes its weighted neighbour sum straight into the interior of the other buffer and then fills that
    # buffer's replicate border in place, so no padding copy or allocation happens per iteration; every neighbour
    # is a strided view of the source buffer, and one multiply-add covers all B·C maps at once.
    pad = max(dilations)
    bufs = [masks.new_empty(*masks.shape[:2], h + 2 * pad, w + 2 * pad) for _ in range(2)]
    bufs[0][..., pad : pad + h, pad : pad + w] = masks
    _fill_replicate_border(bufs[0], pad)
    inner = [buf[..., pad : pad + h, pad : pad + w] for buf in bufs]
    nbs = [[buf[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx, _ in offs] for buf in bufs]
    for it in range(iters):
        src, dst = it % 2, 1 - it % 2
        acc = inner[dst]
        torch.mul(nbs[src][0], weights[0], out=acc)
        for nb, wt in zip(nbs[src][1:], weights[1:]):
            acc.addcmul_(nb, wt)
        if it + 1 < iters:
            _fill_replicate_border(bufs[dst], pad)
    return inner[iters % 2].clone()


def _native_library(masks: Tensor, backend: str):
    """The C kernels for this call, or None for the torch implementation (``backend="native"``: or an error)."""
    if backend == "torch":
        return None
    why = None
    if masks.device.type != "cpu" or masks.dtype != torch.float32:
        why = f"they take float32 CPU tensors, got {masks.dtype} on {masks.device}"
    else:
        lib = native.par_library()
        if lib is not None:
            return lib
        why = "they are not built (see the warning above, or EXCELSEG_NATIVE=0 is set)"
    if backend == "native":
        raise RuntimeError(f"PAR backend 'native' is not available for this call: {why}")
    return None


def _fill_replicate_border(buf: Tensor, pad: int) -> None:
    """Write the replicate padding of width ``pad`` around the interior of ``buf`` (…, H + 2·pad, W + 2·pad)."""
    if pad == 0:
        return
    h, w = buf.shape[-2] - 2 * pad, buf.shape[-1] - 2 * pad
    rows = buf[..., pad : pad + h, :]
    rows[..., :pad] = rows[..., pad : pad + 1]
    rows[..., pad + w :] = rows[..., pad + w - 1 : pad + w]
    buf[..., :pad, :] = buf[..., pad : pad + 1, :]
    buf[..., pad + h :, :] = buf[..., pad + h - 1 : pad + h, :]
