"""THE pseudo-label stage, batched (EXCEL_SPEC §3.3–§3.4): CAMs → box mask → attention refinement → PAR → labels.

Every client calls :func:`pseudo_labels`: the training-free predictor (:class:`~excelseg.predictor.CamPredictor`),
the trainer's pseudo-labels and its validation (through :meth:`~excelseg.model.ExcelModel.pseudo_labels`), the
synthetic world's scorers and the app. A batch holds images with different class counts (padded to the batch's
largest K with all-zero maps and a ``valid`` mask) and different output sizes (grouped by size).

Shapes: B images, K classes per image (padded), ``h × w`` patch grid (N = h·w), (H_b, W_b) output size of image b.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .par import PAR_DILATIONS, par
from .refine import box_mask, minmax_normalize, refine_cams

__all__ = ["PseudoLabels", "class_scores", "labels_from_cams", "pad_lists", "pad_maps", "present_classes",
           "pseudo_labels"]


def _working_size(out_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = int(out_size[0]), int(out_size[1])
    if max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _upsample_argmax(scores: Tensor, out_size: tuple[int, int], lut: Tensor, chunk_rows: int = 256) -> Tensor:
    """uint8 ``lut[argmax_c upsample(scores)]`` at ``out_size`` without holding the upsampled scores.

    Separable bilinear interpolation with the exact align_corners=False source coordinates of ``F.interpolate``
    (``src = (dst + 0.5) · in/out − 0.5``, clamped at 0), columns first, then rows in chunks; so a 12000×9000
    output needs memory for C × h × W plus one chunk, not C × H × W.
    """
    _, h, w = scores.shape
    out_h, out_w = out_size
    dev = scores.device

    def taps(n_out: int, n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = ((torch.arange(n_out, device=dev, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_(min=0)
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        return i0, i1, (src - i0).to(scores.dtype)

    x0, x1, lx = taps(out_w, w)
    cols = scores[:, :, x0] * (1 - lx) + scores[:, :, x1] * lx  # (C, h, W)
    y0, y1, ly = taps(out_h, h)
    out = torch.empty(out_h, out_w, dtype=torch.uint8, device=dev)
    for r in range(0, out_h, chunk_rows):
        sl = slice(r, r + chunk_rows)
        wy = ly[sl].view(1, -1, 1)
        rows = cols[:, y0[sl]] * (1 - wy) + cols[:, y1[sl]] * wy
        out[sl] = lut[rows.max(dim=0).indices]  # max(dim).indices: same first-max rule, ~10x faster than argmax(0)
    return out


def class_scores(
    refined: Tensor,
    images: Tensor,
    size: tuple[int, int],
    *,
    valid: Tensor | None = None,
    use_par: bool = True,
    par_iters: int = 20,
    par_dilations: Sequence[int] = PAR_DILATIONS,
    par_backend: str = "auto",
) -> Tensor:
    """Batched scores ``[bg, classes]`` from refined CAMs (EXCEL_SPEC §3.4; the body of :func:`labels_from_cams`).

    Per map ``(c − min) / (max(c − min) + 1e-7)``; bilinear resize (align_corners=False) to ``size``; background
    ``1 − max_c`` over the valid maps (all ones without any); PAR with ``images``.

    Args:
        refined: (B, K, h, w) refined CAMs; images may have different class counts, padded to K.
        images: (B, 3, Hi, Wi) PAR guidance images.
        size: (H, W) output size.
        valid: (B, K) bool, False for padding maps (which must be all zero); their scores come out as −inf so
            that an argmax never picks them. ``None``: every map is valid.

    Returns:
        (B, K + 1, H, W) scores.
    """
    if refined.dim() != 4:
        raise ValueError(f"refined must be (B, K, h, w), got {tuple(refined.shape)}")
    b, k = refined.shape[:2]
    size = (int(size[0]), int(size[1]))
    dtype = refined.dtype if refined.is_floating_point() else torch.float32
    cams = refined.to(dtype)
    if k > 0:
        cams = minmax_normalize(cams)
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
        bg = 1 - cams.amax(dim=1, keepdim=True)
    else:
        cams = cams.new_zeros((b, 0, *size))
        bg = cams.new_ones((b, 1, *size))
    scores = torch.cat([bg, cams], dim=1)
    if use_par:
        scores = par(images.to(scores), scores, iters=par_iters, dilations=par_dilations, backend=par_backend)
    if valid is not None and k > 0:
        scores[:, 1:].masked_fill_(~valid.to(torch.bool)[:, :, None, None], float("-inf"))
    return scores


@dataclass
class PseudoLabels:
    """Output of :func:`pseudo_labels` for B images."""

    labels: list[Tensor]  # per image (H_b, W_b) uint8: 0 = background, else the channel's label value
    refined: list[Tensor]  # per image (K_b, h, w) CAMs after box mask + refinement (the input CAMs without)
    scores: list[Tensor]  # per image (1 + K_b, h', w') [bg, valid classes] after PAR at the working size
    batch: Tensor | None = field(default=None, repr=False)  # (B, H, W) labels (one output size), ``labels`` its views

    def stacked(self) -> Tensor:
        """(B, H, W) labels when every image has the same output size."""
        return self.batch if self.batch is not None else torch.stack(self.labels)


def present_classes(cls_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C) multi-hot image labels → ``(classes, valid)``, each (B, K) with K the batch's largest class count:
    per image its present class indices in ascending order, then padding (``valid`` False)."""
    present = cls_labels > 0
    k = int(present.sum(dim=1).max()) if present.numel() else 0
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :k]
    return order, present.gather(1, order)


def pad_lists(lists: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Per-image index lists of different lengths → ``(values, valid)``, each (B, K) with K the longest list:
    each row its list, then padding 0 (``valid`` False)."""
    k = max((len(v) for v in lists), default=0)
    values = torch.tensor([list(v) + [0] * (k - len(v)) for v in lists], dtype=torch.long).view(len(lists), k)
    valid = torch.arange(k)[None, :] < torch.tensor([len(v) for v in lists], dtype=torch.long)[:, None]
    return values.to(device), valid.to(device)


def pad_maps(maps: Sequence[Tensor], k: int) -> Tensor:
    """Per-image (K_i, h, w) maps → (B, k, h, w), each image's maps first, padding maps zero (k ≥ every K_i): one
    concatenation and one scatter, not a pad per image."""
    flat = torch.cat(list(maps))  # (ΣK_i, h, w)
    rows = torch.tensor([j * k + c for j, m in enumerate(maps) for c in range(m.shape[0])], dtype=torch.long,
                        device=flat.device)  # where each map goes in the (B·k, h, w) output
    padded = flat.new_zeros(len(maps) * k, *flat.shape[1:]).index_copy_(0, rows, flat)
    return padded.view(len(maps), k, *flat.shape[1:])


def select_classes(cams: Tensor, classes: Tensor, valid: Tensor) -> Tensor:
    """(B, C, h, w) CAMs of every class → (B, K, h, w) the maps of ``classes`` (B, K), padding maps all zero."""
    b, k = classes.shape
    sel = cams.gather(1, classes[:, :, None, None].expand(b, k, *cams.shape[-2:]))
    return sel * valid[:, :, None, None].to(sel.dtype)


@torch.no_grad()
def pseudo_labels(
    cams: Tensor,
    values: Tensor,
    par_images: Tensor,
    sizes: Sequence[tuple[int, int]],
    *,
    valid: Tensor | None = None,
    trans: Tensor | None = None,
    box_threshold: float = 0.79,
    use_par: bool = True,
    par_iters: int = 20,
    par_dilations: Sequence[int] = PAR_DILATIONS,
    par_max_side: int = 1024,
    par_backend: str = "auto",
) -> PseudoLabels:
    """Pseudo-labels of a batch (EXCEL_SPEC §3.3 steps 3–4, §3.4).

    Args:
        cams: (B, K, h, w) CAMs in [0, 1] of each image's classes (padding maps all zero).
        values: (B, K) label value (1…255) of each map; padding entries are ignored.
        par_images: (B, 3, H', W') images guiding PAR (any per-channel affine normalisation, EXCEL_SPEC §3.4).
        sizes: B output sizes (H_b, W_b).
        valid: (B, K) bool, False for padding maps; default every map is valid.
        trans: (B, N, N) transition matrices: box mask (``box_threshold``) + attention refinement;
            ``None``: the CAMs are used as they are.
        use_par, par_iters, par_dilations: PAR settings (``refine`` config section).
        par_max_side: outputs whose longer side exceeds it are scored at a reduced working size and the scores
            bilinearly upsampled before the argmax (memory bound; equal to the reference below it).
        par_backend: :func:`~excelseg.par.par`'s ``backend``.

    Returns:
        :class:`PseudoLabels`. Images of one output size are scored together (one PAR call per size); the
        number of device operations does not grow with B or K (one host read: the class counts).
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must be (B, K, h, w), got {tuple(cams.shape)}")
    b, k = cams.shape[:2]
    if values.shape != (b, k) or len(sizes) != b:
        raise ValueError(f"values must be (B, K) = {(b, k)} and sizes hold B = {b} sizes, got "
                         f"{tuple(values.shape)} and {len(sizes)}")
    dev = cams.device
    valid = torch.ones(b, k, dtype=torch.bool, device=dev) if valid is None else valid.to(torch.bool)
    # every image's valid maps first (stable), so that its outputs are views of its first K_b + 1 channels: one
    # permutation for the batch instead of a boolean selection (and a device sync) per image; a batch whose
    # valid maps already come first (present_classes, label_images) is left alone
    counts = valid.sum(dim=1)
    in_front = valid == (torch.arange(k, device=dev) < counts[:, None])
    stats = torch.cat([counts, in_front.all().reshape(1)]).tolist()  # the one device → host read of the stage
    counts, in_front = stats[:b], bool(stats[b])
    if not in_front:
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        cams = cams.gather(1, order[:, :, None, None].expand_as(cams))
        values, valid = values.gather(1, order), valid.gather(1, order)
    refined = cams
    if trans is not None and k > 0:
        refined = refine_cams(cams, trans, box_mask(cams, box_threshold))
    sizes = [(int(s[0]), int(s[1])) for s in sizes]
    groups: dict[tuple, list[int]] = {}
    for i, out in enumerate(sizes):
        groups.setdefault((_working_size(out, par_max_side), out), []).append(i)
    lut = torch.cat([values.new_zeros(b, 1), values], dim=1).to(torch.uint8)  # channel → label value
    labels: list[Tensor | None] = [None] * b
    scores: list[Tensor | None] = [None] * b
    batch = None
    for (work, out), idx in groups.items():
        if len(idx) == b:  # one size (training, a dataset of one size): no selection
            g_ref, g_img, g_valid, g_lut = refined, par_images, valid, lut
        else:
            sel = torch.tensor(idx, device=dev)
            g_ref, g_img, g_valid, g_lut = refined[sel], par_images[sel], valid[sel], lut[sel]
        sc = class_scores(g_ref, g_img, work, valid=g_valid, use_par=use_par, par_iters=par_iters,
                          par_dilations=par_dilations, par_backend=par_backend)
        if work == out:
            lab = g_lut.gather(1, sc.max(dim=1).indices.flatten(1)).view(len(idx), *out)
            if len(idx) == b:
                batch = lab
        else:
            lab = torch.stack([_upsample_argmax(sc[j], out, lut[i]) for j, i in enumerate(idx)])
        for i, lab_i, sc_i in zip(idx, lab.unbind(0), sc.unbind(0)):
            labels[i], scores[i] = lab_i, sc_i[: 1 + counts[i]]
    return PseudoLabels(labels, [r[:c] for r, c in zip(refined.unbind(0), counts)], scores, batch)


def par_settings(refine: object) -> Mapping[str, object]:
    """The PAR keyword arguments of :func:`pseudo_labels` from a :class:`~excelseg.config.RefineConfig`."""
    return {"use_par": refine.use_par, "par_iters": refine.par_iters, "par_dilations": refine.par_dilations,
            "par_max_side": refine.par_max_side}


def labels_from_cams(
    refined: Tensor,
    image: Tensor,
    out_size: tuple[int, int],
    *,
    values: Sequence[int] | None = None,
    use_par: bool = True,
    par_iters: int = 20,
    par_dilations: Sequence[int] = PAR_DILATIONS,
    par_max_side: int = 1024,
) -> tuple[Tensor, Tensor]:
    """One image's refined CAMs → (scores, label): :func:`pseudo_labels` without refinement, for B = 1.

    Per class ``(c − min) / (max(c − min) + 1e-7)``; bilinear resize (align_corners=False, no antialias, equal to
    ``cv2.resize`` INTER_LINEAR) to the working size; background ``1 − max_c`` (all ones when K = 0); stack
    ``[bg, classes]``; PAR with ``image``; argmax over channels; channel i → ``values[i]`` (EXCEL_SPEC §3.4,
    parity quirk 8).

    Args:
        refined: (K, h, w) refined CAMs of the K ≥ 0 present classes.
        image: (3, Hi, Wi) PAR guidance image (normalised network input).
        out_size: (H, W) output size.
        values: label value of each channel (length K + 1, the first the background's, each 0…255); default 0…K.

    Returns:
        scores (K+1, h', w') at the working size (≤ ``par_max_side``) and the label map (H, W) uint8.
    """
    if refined.dim() != 3:
        raise ValueError(f"refined must be (K, h, w), got {tuple(refined.shape)}")
    k = refined.shape[0]
    values = list(range(k + 1)) if values is None else list(values)
    if len(values) != k + 1 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"values must be K + 1 = {k + 1} label values in 0…255, got {values}")
    if values[0] != 0:
        raise ValueError(f"the background channel's label value must be 0, got {values[0]}")
    out = pseudo_labels(refined[None], torch.tensor([values[1:]], dtype=torch.long, device=refined.device),
                        image[None], [out_size], use_par=use_par, par_iters=par_iters, par_dilations=par_dilations,
                        par_max_side=par_max_side)
    return out.scores[0], out.labels[0]
