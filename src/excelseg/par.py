"""Pixel-adaptive refinement (PAR) of class score maps (EXCEL_SPEC §3.4; the reference's ``utils/PAR.py``).

Each pixel's scores are propagated 20 times over 48 dilated neighbours, weighted by a softmax of colour
similarity plus a small positional term. Four implementations compute it and agree to float rounding:

* ``native``: fused C kernels (:mod:`excelseg._native`) on float32 CPU tensors (the same operations in the same
  order as ``torch``, so the same bits up to the exp);
* ``triton``: fused Triton kernels (:mod:`excelseg._triton_par`) on CUDA tensors: one affinity launch and one
  launch per iteration for a whole batch;
* ``torch``: torch ops streamed neighbour by neighbour (~1,500 small ops per call, cache-friendly on the CPU);
* ``gather``: torch ops as one gather per affinity and one fused gather–multiply–sum (``embedding_bag``) per
  iteration for a whole batch (~50 ops per call, whatever the batch): the launch-light torch path for GPUs
  without Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native as native

__all__ = ["PAR_BACKENDS", "PAR_DILATIONS", "par", "triton_enabled", "use_backend"]

_logger = logging.getLogger(__name__)

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_BACKENDS = ("auto", "native", "triton", "torch", "gather")
ENV_TRITON = "EXCELSEG_TRITON"
# the gather formulation materialises the (B, 3, H·W, Nn) neighbour colours: images are processed in chunks of at
# most this many gathered values (2**27 float32 = 512 MiB; a 500×375 image has 27 M)
GATHER_CHUNK = 1 << 27
_auto_means: contextvars.ContextVar[str] = contextvars.ContextVar("excelseg_par_auto", default="auto")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` means ``backend`` (e.g. the op-count benchmark forces a torch
    formulation through the whole pseudo-label stage); explicit backends are unaffected."""
    if backend not in PAR_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, PAR_BACKENDS))}, got {backend!r}")
    token = _auto_means.set(backend)
    try:
        yield
    finally:
        _auto_means.reset(token)

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
    return list(_positional_affinity_cached(tuple(offs), float(w_color), float(w_pos), dtype))


@functools.lru_cache(maxsize=32)
def _positional_affinity_cached(offs: tuple, w_color: float, w_pos: float, dtype: torch.dtype) -> tuple[float, ...]:
    pos = torch.tensor([abs(dy) * math.sqrt(2.0) if diag else float(max(abs(dy), abs(dx))) for dy, dx, diag in offs],
                       dtype=dtype)
    return tuple((w_pos * (-(pos / pos.std() / w_color).square()).softmax(dim=0)).tolist())


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
    rows = _softmax_band_rows(img.device, bsz, nn_, h, w)
    for r in range(0, h, rows):
        band = torch.stack([wt[:, 0, r : r + rows] for wt in weights], dim=1).softmax(dim=1)
        for i, p in enumerate(pos_aff):
            torch.add(band[:, i], p, out=weights[i][:, 0, r : r + rows])
    return weights


def _softmax_band_rows(device: torch.device, bsz: int, nn_: int, h: int, w: int) -> int:
    """Rows per softmax band of the ``torch`` backend's affinity: ~1 M values (in cache) on the CPU; one band
    elsewhere, where there is no cache to fit and every op is a kernel launch."""
    return max(1, (1 << 20) // max(1, bsz * nn_ * w)) if device.type == "cpu" else h


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

    The implementations (module docstring) agree to float rounding. None records gradients (PAR makes
    pseudo-labels, EXCEL_SPEC §3.4, §5.2).

    Args:
        image: (B, 3, Hi, Wi) image (any per-channel affine normalisation; PAR is invariant to it).
        masks: (B, C, H, W) score maps.
        backend: ``"auto"`` (float32 on the CPU: the C kernels when built, else ``torch``; CUDA: ``triton`` when
            Triton is installed and ``EXCELSEG_TRITON`` is not 0, else ``gather``; other devices: ``torch``),
            ``"native"`` / ``"triton"`` (those kernels, or an error saying why not), ``"torch"`` or ``"gather"``.

    Returns:
        (B, C, H, W) refined maps (same dtype as ``masks``).
    """
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(f"image (B,3,Hi,Wi) / masks (B,C,H,W) expected, got {image.shape} / {masks.shape}")
    if backend not in PAR_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, PAR_BACKENDS))}, got {backend!r}")
    if backend == "auto":
        backend = _auto_means.get()
    h, w = masks.shape[-2:]
    if iters <= 0:
        return masks
    offs = _neighbour_offsets(dilations)
    lib = _native_library(masks, backend) if backend in ("auto", "native") else None
    if lib is not None:
        img = F.interpolate(image.to(masks), size=(h, w), mode="bilinear", align_corners=True)
        pos_aff = _positional_affinity(offs, w_color, w_pos, img.dtype)
        return native.par_cpu(img, masks, [(dy, dx) for dy, dx, _ in offs], pos_aff, w_color, iters, lib)
    if backend == "auto" and masks.device.type == "cuda":
        tri = _triton_module(masks, "auto")
        if tri is not None:
            try:
                return _par_triton(tri, image, masks, offs, w_color, w_pos, iters)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 (a GPU this Triton cannot compile for: warn once, use torch)
                _triton_failed(exc)
        backend = "gather"
    if backend == "triton":
        return _par_triton(_triton_module(masks, "triton"), image, masks, offs, w_color, w_pos, iters)
    img = F.interpolate(image.to(masks), size=(h, w), mode="bilinear", align_corners=True)
    if backend == "gather":
        return _par_gather(img, masks, offs, w_color, w_pos, iters)
    return _par_torch(img, masks, offs, w_color, w_pos, iters)


def _par_triton(tri, image: Tensor, masks: Tensor, offs: list[tuple[int, int, bool]], w_color: float, w_pos: float,
                iters: int) -> Tensor:
    """The ``triton`` backend: the image resized in float32, then :func:`excelseg._triton_par.par_triton`."""
    img = F.interpolate(image.to(masks.device, torch.float32), size=masks.shape[-2:], mode="bilinear",
                        align_corners=True)
    pos_aff = _positional_affinity(offs, w_color, w_pos, torch.float32)
    return tri.par_triton(img, masks, [(dy, dx) for dy, dx, _ in offs], pos_aff, w_color, iters)


def _par_torch(img: Tensor, masks: Tensor, offs: list[tuple[int, int, bool]], w_color: float, w_pos: float,
               iters: int) -> Tensor:
    """The ``torch`` backend: the affinity as Nn weight maps, then the iterations neighbour by neighbour."""
    h, w = masks.shape[-2:]
    weights = _par_affinity(img, offs, w_color, w_pos)  # Nn × (B, 1, H, W)
    # ``iters`` applications of one fixed linear operator. Two padded buffers are reused across iterations: each
    # step writes its weighted neighbour sum straight into the interior of the other buffer and then fills that
    # buffer's replicate border in place, so no padding copy or allocation happens per iteration; every neighbour
    # is a strided view of the source buffer, and one multiply-add covers all B·C maps at once.
    pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offs) if offs else 0
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


@functools.lru_cache(maxsize=16)
def _gather_constants(offs: tuple, w_color: float, w_pos: float, dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """The (2, Nn) neighbour offsets (dy, dx) and the (Nn,) positional weights on ``device``, copied there once."""
    dyx = torch.tensor([[o[0] for o in offs], [o[1] for o in offs]], dtype=torch.long).to(device)
    pos = torch.tensor(_positional_affinity_cached(offs, w_color, w_pos, dtype), dtype=dtype).to(device)
    return dyx, pos


def _neighbour_index(h: int, w: int, dyx: Tensor) -> Tensor:
    """(H·W, Nn) flat index of every pixel's neighbours, coordinates clamped to the image (replicate padding)."""
    ys = (torch.arange(h, device=dyx.device)[:, None] + dyx[0]).clamp_(0, h - 1)  # (H, Nn)
    xs = (torch.arange(w, device=dyx.device)[:, None] + dyx[1]).clamp_(0, w - 1)  # (W, Nn)
    return (ys.mul_(w)[:, None] + xs[None]).view(h * w, dyx.shape[1])


def _par_gather(img: Tensor, masks: Tensor, offs: list[tuple[int, int, bool]], w_color: float, w_pos: float,
                iters: int) -> Tensor:
    """The ``gather`` backend: a whole batch in ~50 torch ops (20 of them the iterations), whatever B, C or H·W.

    The affinity gathers the (B, 3, H·W, Nn) neighbour colours with one ``index_select`` (in chunks of images of at
    most :data:`GATHER_CHUNK` values) and computes the weights with a handful of batched ops, pixel-major
    (B·H·W, Nn); each iteration is one ``embedding_bag``: bag p sums its Nn neighbours' rows of the channel-last
    (B·H·W, C) maps, weighted by the pixel's weights (a fused gather–multiply–sum, nothing materialised).
    """
    b, c, h, w = masks.shape
    n, nn_ = h * w, len(offs)
    dev = masks.device
    dyx, pos_aff = _gather_constants(tuple(offs), float(w_color), float(w_pos), img.dtype, dev)
    idx = _neighbour_index(h, w, dyx)  # (N, Nn)
    flat_idx = idx.view(-1)
    step = max(1, GATHER_CHUNK // max(1, img.shape[1] * n * nn_))
    chunks = []
    for i in range(0, b, step):
        im = img[i : i + step].reshape(-1, img.shape[1], n)
        nb = im.index_select(2, flat_idx).view(im.shape[0], im.shape[1], n, nn_)
        inv = nb.std(dim=3, keepdim=True).add_(1e-8).mul_(w_color).reciprocal_()  # 1 / ((std + 1e-8) · w_color)
        logits = nb.sub_(im[..., None]).mul_(inv).square_().sum(dim=1).mul_(-1.0 / img.shape[1])  # (b, N, Nn)
        chunks.append(logits.softmax(dim=-1).add_(pos_aff))
    weights = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # (B, N, Nn)
    # global neighbour rows of the (B·N, C) maps and the bag boundaries; int32 where it fits (half the memory)
    itype = torch.int32 if b * n < 2**31 and b * n * nn_ < 2**31 else torch.long
    rows = (idx.to(itype)[None] + (torch.arange(b, device=dev, dtype=itype) * n)[:, None, None]).view(-1)
    bags = torch.arange(0, b * n * nn_, nn_, device=dev, dtype=itype)
    psw = weights.view(-1)
    x = masks.permute(0, 2, 3, 1).reshape(b * n, c)
    for _ in range(iters):
        x = F.embedding_bag(rows, x, bags, mode="sum", per_sample_weights=psw)
    return x.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def _native_library(masks: Tensor, backend: str):
    """The C kernels for this call, or None for the torch implementation (``backend="native"``: or an error)."""
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


def triton_enabled() -> bool:
    """False when ``EXCELSEG_TRITON`` is 0/false/no/off (``backend="auto"`` then uses ``gather`` on CUDA)."""
    return os.environ.get(ENV_TRITON, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _import_triton_par():
    """:mod:`excelseg._triton_par`, or the reason it cannot be imported (logged once)."""
    try:
        from . import _triton_par
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken Triton install)
        why = f"Triton is not usable here ({type(exc).__name__}: {exc})"
        _logger.info("PAR: %s; CUDA tensors use the 'gather' torch backend", why)
        return why
    return _triton_par


_triton_failure: list[str] = []  # why the Triton kernels failed in this process ("auto" no longer tries them)


def _triton_failed(exc: Exception) -> None:
    why = f"{type(exc).__name__}: {exc}"
    _triton_failure.append(why)
    _logger.warning("PAR: the Triton kernels failed (%s); using the 'gather' torch backend on CUDA from now on "
                    "(set EXCELSEG_TRITON=0 to skip them)", why)


def _triton_module(masks: Tensor, backend: str):
    """:mod:`excelseg._triton_par` for this call, or None (``backend="triton"``: or an error saying why not)."""
    why = None
    if backend == "auto" and (_triton_failure or not triton_enabled()):
        return None
    mod = _import_triton_par()
    if isinstance(mod, str):
        why = mod
    elif masks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why = f"the kernels compute in float32 (float16/bfloat16 are widened), got {masks.dtype}"
    elif masks.device.type != "cuda" and not (masks.device.type == "cpu" and mod.interpreting()):
        why = f"they take CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {masks.device}"
    else:
        return mod
    if backend == "triton":
        raise RuntimeError(f"PAR backend 'triton' is not available for this call: {why}")
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
