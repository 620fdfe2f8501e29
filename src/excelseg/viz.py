"""Overlays for people to look at: label colours with a legend, CAM heat-maps, and sheets of both.

:func:`overlay` (label colours + legend), :func:`heatmap` (CAM in a jet colour map + title) and
:func:`overlay_sheet` (both, tiled, each panel bounded by ``max_side``) return uint8 RGB arrays; all pixel work is
vectorised numpy (large inputs are subsampled *before* blending, so a 12000×9000 image stays cheap), text is drawn
with Pillow's default font.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io.images import WHITE, check_layout, exif_swaps_sides, pil_to_rgb, to_rgb_array
from .io.palette import IGNORE_INDEX, VOC_PALETTE

__all__ = ["comparison_sheet", "heatmap", "jet_colormap", "outlined_labels", "overlay", "overlay_sheet"]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _font_size(width: int) -> int:
    return int(min(40, max(10, round(width / 40))))


def _text_size(font: Any, text: str) -> tuple[int, int]:
    left, _top, right, bottom = font.getbbox(text)
    return math.ceil(right - min(left, 0)), math.ceil(bottom)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Jet-like colour map: values in [0, 1] → ``(..., 3)`` uint8 (dark blue → cyan → yellow → dark red).

    Piecewise linear: ``channel = clip(1.5 − |4x − c|, 0, 1)`` with ``c`` = 3 (red), 2 (green), 1 (blue).
    Values outside [0, 1] are clipped.
    """
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


_JET_LUT = jet_colormap(np.arange(256, dtype=np.float32) / 255.0)
_JET_LUT.setflags(write=False)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 − α)·base + α·colour`` on uint8 arrays, rounded (integer arithmetic)."""
    a = np.uint16(round(min(max(alpha, 0.0), 1.0) * 255))
    mixed = (base.astype(np.uint16) * (np.uint16(255) - a) + colour.astype(np.uint16) * a + np.uint16(127))
    return (mixed // np.uint16(255)).astype(np.uint8)


def _names_lookup(names: Mapping[int, str] | Sequence[str] | None, value: int) -> str:
    if names is None:
        return f"class {value}"
    if isinstance(names, Mapping):
        return str(names.get(value, f"class {value}"))
    return str(names[value]) if 0 <= value < len(names) else f"class {value}"


def _legend_strip(width: int, entries: list[tuple[tuple[int, int, int], str]]) -> np.ndarray:
    font = _font(_font_size(width))
    _, text_h = _text_size(font, "Ag")
    sw = max(8, text_h)  # swatch side
    pad = max(3, sw // 3)
    if not entries:
        entries_text = [(None, "(no labelled classes)")]
    else:
        entries_text = list(entries)
    # flow layout
    positions: list[tuple[int, int]] = []
    x, y = pad, pad
    row_h = max(sw, text_h) + pad
    for colour, name in entries_text:
        tw, _ = _text_size(font, name)
        ew = (sw + pad if colour is not None else 0) + tw + 2 * pad
        if x > pad and x + ew > width:
            x, y = pad, y + row_h
        positions.append((x, y))
        x += ew
    height = y + row_h + pad
    strip = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(strip)
    for (colour, name), (ex, ey) in zip(entries_text, positions):
        tx = ex
        if colour is not None:
            draw.rectangle([ex, ey, ex + sw - 1, ey + sw - 1], fill=tuple(int(c) for c in colour),
                           outline=(64, 64, 64))
            tx = ex + sw + pad
        draw.text((tx, ey), name, fill=(0, 0, 0), font=font)
    return np.array(strip)


def _title_strip(width: int, title: str) -> np.ndarray:
    font = _font(_font_size(width))
    text_h = max(_text_size(font, "Ag")[1], _text_size(font, title)[1])  # same height for every title
    pad = max(3, text_h // 3)
    strip = Image.new("RGB", (width, text_h + 2 * pad), WHITE)
    ImageDraw.Draw(strip).text((pad, pad), title, fill=(0, 0, 0), font=font)
    return np.array(strip)


def _check_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or label.shape != hw:
        raise ValueError(f"label shape {label.shape} does not match the image's (H, W) = {hw}")
    if label.dtype.kind not in "biu":
        raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}")
    return label


def overlay(
    image_rgb: np.ndarray | Image.Image,
    label: np.ndarray,
    names: Mapping[int, str] | Sequence[str] | None = None,
    alpha: float = 0.5,
    background_index: int | None = 0,
    legend: bool = True,
) -> np.ndarray:
    """Label colours blended over the image, with a legend strip underneath.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 (or anything :func:`to_rgb_array` accepts).
        label: ``(H, W)`` integer class ids; each id ``c`` is painted in ``VOC_PALETTE[c]`` with opacity
            ``alpha``. ``background_index`` (default 0) and 255 (ignore) are left untinted.
        names: class id → name for the legend (a mapping, or a sequence indexed by id); missing ids are shown
            as ``class <id>``.
        legend: append the legend strip (one swatch + name per tinted id present, in id order).

    Returns:
        ``(H + legend height, W, 3)`` uint8.
    """
    img = to_rgb_array(image_rgb)
    lab = _check_label(label, img.shape[:2])
    tinted = lab != IGNORE_INDEX
    if background_index is not None:
        tinted &= lab != background_index
    tinted &= (lab >= 0) & (lab <= 255)
    out = img.copy()
    if tinted.any():
        ids = lab[tinted].astype(np.int64)
        out[tinted] = _blend(img[tinted], VOC_PALETTE[ids], alpha)
    if not legend:
        return out
    present = np.unique(lab[tinted]).tolist() if tinted.any() else []
    entries = [(tuple(VOC_PALETTE[int(v)].tolist()), _names_lookup(names, int(v))) for v in present]
    return np.concatenate([out, _legend_strip(out.shape[1], entries)], axis=0)


def _resize_float(cam: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``hw`` (huge maps are strided down to ≤ 2× first)."""
    h, w = hw
    cam = _stride_down(np.asarray(cam), (h, w))
    cam = np.ascontiguousarray(cam, dtype=np.float32)
    if cam.shape == (h, w):
        return cam
    resized = Image.fromarray(cam).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def heatmap(
    image_rgb: np.ndarray | Image.Image,
    cam: np.ndarray,
    title: str = "",
    alpha: float = 0.5,
) -> np.ndarray:
    """A CAM in the jet colour map blended over the image, with a title strip on top.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 (or anything :func:`to_rgb_array` accepts).
        cam: ``(h, w)`` float in [0, 1] (a 1e-3 tolerance is clipped); resized bilinearly when not ``(H, W)``.
        title: text of the title strip ("" draws an empty strip of the same height).

    Returns:
        ``(title height + H, W, 3)`` uint8.

    Raises:
        ValueError: ``cam`` is not 2-D, holds NaN, or leaves [0, 1].
    """
    img = to_rgb_array(image_rgb)
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.shape[0] < 1 or cam.shape[1] < 1:
        raise ValueError(f"cam must be a 2-D (H, W) map, got shape {cam.shape}")
    cam = _resize_float(cam, img.shape[:2])
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or infinite values")
    lo, hi = float(cam.min()), float(cam.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"cam values must lie in [0, 1], got [{lo:g}, {hi:g}] (normalise the CAM first)")
    levels = np.rint(np.clip(cam, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = _blend(img, _JET_LUT[levels], alpha)
    return np.concatenate([_title_strip(out.shape[1], title), out], axis=0)


def _nearest_index(n_src: int, n_dst: int) -> np.ndarray:
    idx = ((np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst)).astype(np.int64)
    return np.minimum(idx, n_src - 1)


def _stride_down(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour subsample of the first two axes to at most 2× ``hw`` (reads only the kept pixels)."""
    h, w = hw
    H, W = arr.shape[:2]
    hh, ww = min(H, 2 * h), min(W, 2 * w)
    if (hh, ww) == (H, W):
        return arr
    return arr[np.ix_(_nearest_index(H, hh), _nearest_index(W, ww))]


def _fit(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    H, W = hw
    scale = min(1.0, max_side / max(H, W))
    return max(1, round(H * scale)), max(1, round(W * scale))


def _downscale_rgb(image: np.ndarray | Image.Image, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    if isinstance(image, Image.Image):
        rgb = pil_to_rgb(image)
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.array(rgb)
    arr = np.asarray(image)
    check_layout(arr.shape)
    small = to_rgb_array(np.ascontiguousarray(_stride_down(arr, hw)))
    if small.shape[:2] == (h, w):
        return small
    return np.array(Image.fromarray(small).resize((w, h), Image.Resampling.BOX))


def _pad_to(panel: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    out[: panel.shape[0], : panel.shape[1]] = panel
    return out


def overlay_sheet(
    image_rgb: np.ndarray | Image.Image,
    label: np.ndarray,
    names: Mapping[int, str] | Sequence[str] | None,
    cams: np.ndarray,
    cam_titles: Sequence[str],
    max_side: int = 768,
    alpha: float = 0.5,
    columns: int | None = None,
    gap: int = 4,
    label_title: str = "labels",
) -> np.ndarray:
    """One picture: the label :func:`overlay` followed by one :func:`heatmap` per CAM, tiled in a grid.

    Everything is shrunk **before** blending so that each panel's image part has its longer side ≤
    ``max_side`` (a 12000×9000 photo costs no more than a 768×576 one; arrays are subsampled by indexing, so
    even lazily broadcast inputs are never materialised). Labels are resized nearest-neighbour, CAMs bilinearly
    (CAMs of any resolution are accepted).

    Args:
        image_rgb: ``(H, W, 3)`` uint8 (or anything :func:`to_rgb_array` accepts).
        label: ``(H, W)`` class ids.
        cams: ``(K, h, w)`` float maps in [0, 1]; ``cam_titles`` has K entries.
        columns: grid columns (default ``ceil(sqrt(K + 1))``).
        label_title: title above the label panel (keeps its image aligned with the titled heat-maps).

    Returns:
        ``(rows·cell_h + gaps, cols·cell_w + gaps, 3)`` uint8 on a white background.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be ≥ 1, got {max_side}")
    if isinstance(image_rgb, Image.Image):
        H, W = image_rgb.height, image_rgb.width
        if exif_swaps_sides(image_rgb):
            H, W = W, H
    else:
        shape = np.shape(image_rgb)
        check_layout(tuple(shape))
        H, W = shape[:2]
    label = np.asarray(label)
    if label.shape != (H, W):
        raise ValueError(f"label shape {label.shape} does not match the image's (H, W) = {(H, W)}")
    cams = np.asarray(cams)
    if cams.ndim == 2:
        cams = cams[None]
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    if len(cam_titles) != cams.shape[0]:
        raise ValueError(f"{cams.shape[0]} CAMs but {len(cam_titles)} titles")
    hw = _fit((H, W), max_side)
    small_img = _downscale_rgb(image_rgb, hw)
    small_label = label[np.ix_(_nearest_index(H, hw[0]), _nearest_index(W, hw[1]))]
    labelled = overlay(small_img, small_label, names, alpha=alpha)
    panels = [np.concatenate([_title_strip(labelled.shape[1], label_title), labelled], axis=0)]
    for k, title in enumerate(cam_titles):
        panels.append(heatmap(small_img, _resize_float(cams[k], hw), str(title), alpha=alpha))
    n = len(panels)
    cols = columns if columns is not None else math.ceil(math.sqrt(n))
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    cell_h = max(p.shape[0] for p in panels)
    cell_w = max(p.shape[1] for p in panels)
    sheet = np.full((rows * cell_h + (rows - 1) * gap, cols * cell_w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        y, x = r * (cell_h + gap), c * (cell_w + gap)
        sheet[y : y + cell_h, x : x + cell_w] = _pad_to(panel, (cell_h, cell_w))
    return sheet


def outlined_labels(image_rgb: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.45,
                    background_index: int = 0) -> np.ndarray:
    """Label regions over a **grey-scale** copy of the image: a translucent fill and a solid 1-pixel outline in
    ``palette[id]``, so label colours can never be mistaken for the colours of the objects underneath.

    Args:
        image_rgb: ``(H, W, 3)`` uint8; label: ``(H, W)`` integer ids (``background_index`` and 255 untinted).
        palette: ``(K, 3)`` uint8, row = label id.
    Returns:
        ``(H, W, 3)`` uint8.
    """
    img = to_rgb_array(image_rgb)
    lab = _check_label(label, img.shape[:2]).astype(np.int64)
    grey = np.rint(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    out = np.repeat(grey[:, :, None], 3, axis=2)
    tinted = (lab != background_index) & (lab != IGNORE_INDEX) & (lab >= 0) & (lab < len(palette))
    if tinted.any():
        out[tinted] = _blend(out[tinted], palette[lab[tinted]], alpha)
        padded = np.pad(lab, 1, mode="edge")
        edge = np.zeros_like(tinted)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # a 4-neighbour holds another id
            edge |= padded[dy:dy + lab.shape[0], dx:dx + lab.shape[1]] != lab
        edge &= tinted
        out[edge] = palette[lab[edge]]
    return out


def comparison_sheet(rows: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]], column_titles: Sequence[str],
                     names: Sequence[str], palette: np.ndarray, scale: int = 3, gap: int = 4) -> np.ndarray:
    """Scenes side by side: per row the image, then each label map as :func:`outlined_labels`; one title strip
    on top (``column_titles``: the image's, then one per label map) and one legend strip at the bottom listing
    every id shown (swatch = its palette colour, text = ``names[id]``).

    Args:
        rows: ``(image (H, W, 3) uint8, [label (H, W) ints, ...])`` per scene, same sizes throughout.
        palette: ``(K, 3)`` uint8 colours by id; scale: nearest-neighbour enlargement of every panel.
    Returns:
        ``(height, width, 3)`` uint8 on white.
    """
    if not rows:
        raise ValueError("comparison_sheet needs at least one row")
    panels_per_row = 1 + len(rows[0][1])
    if len(column_titles) != panels_per_row:
        raise ValueError(f"{panels_per_row} columns but {len(column_titles)} titles")
    shown: set[int] = set()
    grid = []
    for image, labels in rows:
        img = to_rgb_array(image)
        panels = [img] + [outlined_labels(img, lab, palette) for lab in labels]
        for lab in labels:
            shown.update(int(v) for v in np.unique(lab) if 0 < v < len(palette))
        big = [np.repeat(np.repeat(p, scale, axis=0), scale, axis=1) for p in panels]
        grid.append(big)
    cell_h, cell_w = grid[0][0].shape[:2]
    width = panels_per_row * cell_w + (panels_per_row - 1) * gap
    font = _font(_font_size(width))  # one size for every title, readable at the sheet's width
    pad = max(3, _text_size(font, "Ag")[1] // 3)
    strip = Image.new("RGB", (width, _text_size(font, "Ag")[1] + 2 * pad), WHITE)
    draw = ImageDraw.Draw(strip)
    for c, title in enumerate(column_titles):
        draw.text((c * (cell_w + gap) + pad, pad), str(title), fill=(0, 0, 0), font=font)
    titles = np.array(strip)
    body = np.full((len(grid) * cell_h + (len(grid) - 1) * gap, width, 3), 255, np.uint8)
    for r, big in enumerate(grid):
        for c, panel in enumerate(big):
            y, x = r * (cell_h + gap), c * (cell_w + gap)
            body[y:y + cell_h, x:x + cell_w] = panel
    legend = _legend_strip(width, [(tuple(int(v) for v in palette[i]), str(names[i])) for i in sorted(shown)])
    return np.concatenate([titles, body, legend], axis=0)
