"""Affinity refinement and box masks of CAMs (EXCEL_SPEC §3.3).

Pipeline for one image with ``K`` present classes on an ``h × w`` patch grid (``N = h·w`` tokens, row-major):

1. :func:`transition_matrix` — Sinkhorn-style normalisation of the layer-averaged patch×patch attention,
   symmetrised and squared (EXCEL_SPEC §3.3 step 2).
2. :func:`box_mask` — union of the bounding boxes of the 8-connected components of the thresholded CAM, with the
   reference's exclusive, clipped box end (EXCEL_SPEC §3.3 step 3; parity README §5 quirk 7).
3. :func:`refine_cams` — the transition matrix applied to the box-masked CAM (EXCEL_SPEC §3.3 step 4).

PAR is :mod:`excelseg.par`; refined CAMs become labels in :mod:`excelseg.pseudo`. Everything is vectorised torch
and runs on whatever device the inputs live on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._deprecated import moved

__all__ = ["box_mask", "flip_max_cams", "minmax_normalize", "refine_cams", "transition_matrix"]

# ----------------------------------------------------------------------------------------------------------------
# §3.3 affinity refinement
# ----------------------------------------------------------------------------------------------------------------


def transition_matrix(attn: Tensor, iters: int = 3) -> Tensor:
    """Transition matrix from a patch×patch affinity (EXCEL_SPEC §3.3 step 2).

    Args:
        attn: (B, N, N) non-negative affinity (already averaged over layers by the caller).
        iters: number of (column-normalise, row-normalise) rounds.

    Returns:
        (B, N, N): ``S @ S`` with ``S = (T + Tᵀ) / 2`` and ``T`` the Sinkhorn-normalised ``attn``.
    """
    if attn.dim() != 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, N, N), got {tuple(attn.shape)}")
    t = attn
    for _ in range(iters):
        t = t / t.sum(dim=-2, keepdim=True)  # every column sums to 1
        t = t / t.sum(dim=-1, keepdim=True)  # every row sums to 1
    t = (t + t.transpose(-1, -2)) / 2
    return t @ t


def _components(fg: Tensor) -> Tensor:
    """8-connected component labels of boolean maps, all maps at once (EXCEL_SPEC §3.3 step 3).

    Label propagation with pointer jumping: every foreground pixel starts with ``1 +`` its flat index and repeatedly
    takes the largest label of its 3×3 neighbourhood (a max-pool, background held at 0), then the label of the
    pixel its label points to. Six batched ops per round and one convergence test (a device sync); the number of
    rounds depends on the components' shapes, not on the number of maps.

    Args:
        fg: (M, h, w) bool foreground.

    Returns:
        (M, h·w) int64 labels: 0 on background; on a component, ``1 + `` the largest flat index of its pixels.
    """
    m, h, w = fg.shape
    n = h * w
    # float labels for max-pooling; float32 is exact up to 2**24 pixels.
    dtype = torch.float32 if n < 2**24 else torch.float64
    mask = fg.reshape(m, n)
    lab = torch.arange(1, n + 1, device=fg.device, dtype=dtype).mul(mask)  # (M, N), 0 on background
    zero = lab.new_zeros(m, 1)
    while True:
        new = F.max_pool2d(lab.view(m, 1, h, w), 3, stride=1, padding=1).view(m, n).mul_(mask)
        # pointer jumping: the pixel a label L points to (flat index L − 1) carries a label at least as large and is
        # in the same component, so taking it only speeds up convergence; background (L = 0) reads the 0 in front
        torch.maximum(new, torch.cat([zero, new], dim=1).gather(1, new.long()), out=new)
        if torch.equal(new, lab):
            return lab.long()
        lab = new


def box_mask(cams: Tensor, threshold: float) -> Tensor:
    """Column mask from the bounding boxes of thresholded CAMs (EXCEL_SPEC §3.3 step 3, parity quirk 7).

    Per map: ``u = floor(255·cam)`` (the reference's uint8 truncation, computed in float32 like the reference's
    numpy array), ``thr = int(threshold · max(u))``, foreground ``u > thr``. Every 8-connected foreground
    component (= what OpenCV ``findContours`` traces; hole contours lie inside their outer contour) gives a box
    with inclusive extents ``[x0..xmax] × [y0..ymax]``; the reference marks ``[y0, min(ymax+1, h−1)) ×
    [x0, min(xmax+1, w−1))``, so the last row and column are never inside a box. No foreground → empty mask.

    All B·K maps are processed together (padding maps of a batch included: an all-zero map has no foreground);
    the number of ops does not grow with B or K.

    Args:
        cams: (B, K, h, w) float CAMs in [0, 1]; K may be 0.
        threshold: τ_box.

    Returns:
        (B, K, h, w) bool mask (union of the boxes).
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be (B, K, h, w), got {tuple(cams.shape)}")
    b, k, h, w = cams.shape
    if cams.numel() == 0:
        return torch.zeros(cams.shape, dtype=torch.bool, device=cams.device)
    m, n = b * k, h * w
    u = (cams.detach().to(torch.float32) * 255).clamp_(0, 255).floor_().view(m, n)
    thr = (u.amax(dim=1, keepdim=True).double() * float(threshold)).floor_()
    labels = _components((u.double() > thr).view(m, h, w))  # (M, N), 0 = background

    dev = cams.device
    pos = torch.arange(n, device=dev)
    rows, cols = pos // w, pos % w
    # per label slot (0 = background, discarded), all four extents in one scatter: max of (−row, row, −col, col)
    # = (−y0, ymax, −x0, xmax); slots without pixels keep −(n + 1)
    coords = torch.stack([-rows, rows, -cols, cols])[:, None].expand(4, m, n)
    ext = torch.full((4, m, n + 1), -(n + 1), device=dev, dtype=torch.long)
    ext.scatter_reduce_(2, labels.expand(4, m, n), coords, "amax")
    valid = ext[1] >= 0
    valid[:, 0] = False
    y0, x0 = ext[0].neg().clamp_(max=h - 1), ext[2].neg().clamp_(max=w - 1)
    y1 = (ext[1] + 1).clamp_(0, h - 1)
    x1 = (ext[3] + 1).clamp_(0, w - 1)

    # rasterise all boxes at once with a 2-D difference array: +1/−1 at the corners, then 2-D prefix sums.
    one = valid.to(torch.int32)
    wd = w + 1
    y0, y1 = y0 * wd, y1 * wd
    corners = torch.cat([y0 + x0, y0 + x1, y1 + x0, y1 + x1], dim=1)
    signs = torch.cat([one, -one, -one, one], dim=1)
    diff = torch.zeros(m, (h + 1) * wd, device=dev, dtype=torch.int32).scatter_add_(1, corners, signs)
    cover = diff.view(m, h + 1, wd).cumsum(1).cumsum(2)[:, :h, :w]
    return (cover > 0).view(b, k, h, w)


def refine_cams(cams: Tensor, trans: Tensor, box: Tensor) -> Tensor:
    """Affinity-refined, box-masked CAMs (EXCEL_SPEC §3.3 step 4).

    ``cam'_c[i] = Σ_j T[i, j] · 1[j inside a box of c] · cam_c[j]``, i.e. the box mask selects the *columns* of
    ``T`` (``(T ⊙ 1[column j in box]) · vec(cam_c)``), matching the reference's ``refined_static`` golden.

    Args:
        cams: (B, K, h, w) CAMs.
        trans: (B, N, N) transition matrix, N = h·w in row-major token order.
        box: (B, K, h, w) bool box mask.

    Returns:
        (B, K, h, w) refined CAMs.
    """
    b, k, h, w = cams.shape
    if trans.shape != (b, h * w, h * w):
        raise ValueError(f"trans must be {(b, h * w, h * w)}, got {tuple(trans.shape)}")
    masked = (cams * box.to(cams.dtype)).reshape(b, k, h * w)
    return (masked @ trans.to(cams.dtype).transpose(-1, -2)).view(b, k, h, w)


def minmax_normalize(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Per map ``(m − min) / (max(m − min) + eps)`` over the last two axes (EXCEL_SPEC §3.4; the reference's
    refined CAMs use eps = 1e-7, its flip-max LVC CAMs 1e-5)."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + eps)


def flip_max_cams(cams: Tensor, cams_flipped: Tensor) -> Tensor:
    """Flip-augmented CAMs as the reference's LVC inference combines them (parity README §4.2 ``cam_lvc_flip``).

    Args:
        cams: (B, C, h, w) CAMs of the images; cams_flipped: (B, C, h, w) CAMs of the mirrored images.

    Returns:
        (B, C, h, w) ``max(cams, mirror(cams_flipped))``, then per map ``(m − min) / (max(m − min) + 1e-5)``.
    """
    return minmax_normalize(torch.maximum(cams, cams_flipped.flip(-1)), eps=1e-5)


# moved in 0.2: PAR to excelseg.par, refined CAMs → labels to excelseg.pseudo
__getattr__ = moved(__name__, {"par": "excelseg.par", "PAR_DILATIONS": "excelseg.par",
                               "labels_from_cams": "excelseg.pseudo", "class_scores": "excelseg.pseudo"})
