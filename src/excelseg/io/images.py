"""Reading images safely: any file Pillow decodes, any array layout, one clear error.

:func:`read_image` opens any file Pillow can decode, forces the full decode (so truncated or corrupt files fail
here, with one clear :class:`ImageReadError`, not later inside a model), applies the EXIF orientation and
converts every Pillow mode to 8-bit RGB (rules in :func:`to_rgb_array`). :func:`collect_images` turns the files /
directories / glob patterns a user typed into a sorted, de-duplicated list of image paths.

Writing (masks, arrays, JSON) is :mod:`excelseg.io.files`; overlays are :mod:`excelseg.viz`.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from .._messages import one_line

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "WHITE",
    "ImageReadError",
    "check_layout",
    "collect_images",
    "exif_swaps_sides",
    "one_line",
    "pil_to_rgb",
    "read_image",
    "to_rgb_array",
]

#: Largest image (width × height) :func:`read_image` accepts by default: 200 megapixels. Pillow's own
#: decompression-bomb guard (89 MP warning, 179 MP error) is raised to this value only while excelseg reads.
MAX_PIXELS = 200_000_000

#: File suffixes (lower case, with the dot) that :func:`collect_images` picks up from directories and globs.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# what a malformed EXIF block can make Pillow raise
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, KeyError, TypeError, IndexError, struct.error)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
WHITE = (255, 255, 255)


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason on one line."""


# --------------------------------------------------------------------------------------------------------------
# reading


_bomb_lock = threading.Lock()
_bomb_users = 0
_bomb_saved: int | None = None


@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit to at least ``max_pixels`` while the block runs.

    Only raised, never lowered or disabled, and restored when the last concurrent reader leaves. Images above
    ``max_pixels`` are refused by :func:`read_image` itself.
    """
    global _bomb_users, _bomb_saved
    with _bomb_lock:
        if _bomb_users == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels
        _bomb_users += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_users -= 1
            if _bomb_users == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def read_image(path: PathLike, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Read an image file as a fully decoded 8-bit RGB :class:`PIL.Image.Image`.

    The EXIF orientation is applied (a portrait phone photo comes back portrait) and every mode is converted to
    RGB by the rules of :func:`to_rgb_array` (alpha composited over white, 16-bit scaled by its bit depth, …).

    ``max_side``: return the image reduced (aspect kept) so that its longer side is at most this many pixels.
    JPEGs are then decoded at a reduced scale (1/2, 1/4 or 1/8, still ≥ ``max_side``; Pillow's ``draft``), so a
    12000×9000 photo never exists at full size in memory; other formats are decoded in full, then reduced.

    Raises:
        ImageReadError: the path does not exist or is a directory, the file is empty, not an image, truncated or
            corrupt, in a mode that cannot be converted, or larger than ``max_pixels`` (default 200 MP).
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"cannot read image {p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"cannot read image {p}: it is a directory")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageReadError(f"cannot read image {p}: {one_line(exc)}") from exc
    if size == 0:
        raise ImageReadError(f"cannot read image {p}: empty file (0 bytes)")
    try:
        with _pillow_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(p, "rb") as fh:
                try:
                    img = Image.open(fh)
                except Image.UnidentifiedImageError as exc:
                    raise ImageReadError(f"cannot read image {p}: not an image format Pillow recognises") from exc
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageReadError(
                        f"cannot read image {p}: {w}x{h} = {w * h:,} pixels is more than the limit of "
                        f"{max_pixels:,} (read_image(max_pixels=...))"
                    )
                if max_side is not None and max(w, h) > max_side:
                    f = max_side / max(w, h)
                    img.draft(None, (math.ceil(w * f), math.ceil(h * f)))  # JPEG: DCT scaling; others: no-op
                img.load()  # full decode now: truncation / corruption surfaces here
            rgb = pil_to_rgb(img, source=p)
            if max_side is not None and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            return rgb
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(
            f"cannot read image {p}: larger than the {max_pixels:,}-pixel limit ({one_line(exc)})"
        ) from exc
    except MemoryError as exc:
        raise ImageReadError(f"cannot read image {p}: out of memory while decoding") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, EOFError, ... on bad data
        reason = one_line(exc)
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageReadError(f"cannot read image {p}: {reason}") from exc


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112 = Orientation
    except _EXIF_ERRORS:  # malformed EXIF: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _composite_over_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def pil_to_rgb(img: Image.Image, source: object = None) -> Image.Image:
    """Any Pillow image → RGB image (EXIF orientation applied). ``source`` only names the file in errors."""
    try:
        img.load()
    except OSError as exc:
        where = source if source is not None else getattr(img, "filename", "") or "<image>"
        raise ImageReadError(f"cannot read image {where}: {one_line(exc)}") from exc
    img = _apply_exif_orientation(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        grey = _high_depth_to_uint8(np.asarray(img), mode, source)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_over_white(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        where = f" {source}" if source is not None else ""
        raise ValueError(f"cannot convert image{where} of mode {mode!r} to RGB ({one_line(exc)})") from exc


@lru_cache(maxsize=1)
def _u16_lut() -> np.ndarray:
    """uint16 → uint8 rounding table: ``round(v · 255 / 65535)``."""
    v = np.arange(65536, dtype=np.uint32)
    lut = ((v * 255 + 32767) // 65535).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _high_depth_to_uint8(arr: np.ndarray, mode: str, source: object = None) -> np.ndarray:
    """16/32-bit integer or float greyscale → uint8, scaled by the bit depth (never clipped).

    * ``I;16*`` (16-bit): ``v · 255 / 65535``.
    * ``I`` (32-bit signed): data in [0, 65535] is 16-bit data (how Pillow opens 16-bit PGM/PNG/TIFF) and scaled
      as such; larger non-negative data is scaled by 2³¹ − 1; data with negative values maps
      [−2³¹, 2³¹ − 1] → [0, 255].
    * ``F``: values in [0, 1] are scaled by 255, values in [0, 255] are taken as 8-bit levels; anything else
      (or NaN/inf) is a ``ValueError``.
    """
    where = f" {source}" if source is not None else ""
    if mode.startswith("I;16"):
        a = arr.astype(np.int64, copy=False) if arr.dtype.kind == "i" else arr
        if a.dtype.kind == "i":  # signed 16-bit variants: negative values are below black
            a = np.clip(a, 0, 65535)
        return _u16_lut()[a.astype(np.uint16, copy=False)]
    if mode == "I":
        if arr.size == 0:
            return arr.astype(np.uint8)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            return _u16_lut()[arr.astype(np.uint16)]
        if lo >= 0:
            return np.rint(arr.astype(np.float64) * (255.0 / 2147483647.0)).astype(np.uint8)
        return np.rint((arr.astype(np.float64) + 2147483648.0) * (255.0 / 4294967295.0)).astype(np.uint8)
    if mode == "F":
        return _float_to_uint8(arr, allow_255=True, what=f"float image{where}")
    raise ValueError(f"cannot convert image{where} of mode {mode!r} to RGB")


def _float_to_uint8(arr: np.ndarray, allow_255: bool, what: str) -> np.ndarray:
    if arr.size == 0:
        return arr.astype(np.uint8)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(arr * np.float32(255.0)).astype(np.uint8)
    if allow_255 and lo >= 0.0 and hi <= 255.0:
        return np.rint(arr).astype(np.uint8)
    expected = "[0, 1] (or [0, 255])" if allow_255 else "[0, 1]"
    raise ValueError(f"{what} has values in [{lo:g}, {hi:g}]; expected {expected}")


_LAYOUT_HINT = "expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) — channels last"


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Numpy image of any accepted dtype → uint8 of the same shape."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return _u16_lut()[arr]
    if kind == "b":
        return arr.view(np.uint8) * np.uint8(255)
    if kind == "f":
        return _float_to_uint8(arr, allow_255=False, what="float image array")
    raise ValueError(
        f"unsupported image dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1]"
    )


def check_layout(shape: tuple[int, ...]) -> None:
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"empty image of shape {shape}; images must be at least 1x1")
        return
    hint = ""
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        hint = " (a channel-first array needs arr.transpose(1, 2, 0))"
    raise ValueError(f"unsupported image array shape {shape}; {_LAYOUT_HINT}{hint}")


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any image → ``(H, W, 3)`` uint8 RGB array.

    Pillow images: EXIF orientation applied; L/1/P/CMYK/YCbCr/… converted by Pillow; alpha (RGBA, LA, PA,
    ``transparency``) composited **over white**; 16-bit ``I;16`` scaled ``v·255/65535``; ``I`` and ``F`` by the
    rules of the module (16-bit data in ``I`` is scaled as 16-bit; ``F`` in [0, 1] ×255, in [0, 255] as is).

    Numpy arrays (channels last): ``(H, W)`` grey, ``(H, W, 1)``, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA (alpha
    over white); dtype uint8, uint16 (×255/65535, rounded), bool (0/255) or float in [0, 1] (other values →
    ``ValueError``). A contiguous ``(H, W, 3)`` uint8 input is returned as is (no copy).

    Raises:
        ValueError: unsupported shape (e.g. channel-first), dtype, value range, mode, or an empty image.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image of size {image.width}x{image.height}; images must be at least 1x1")
        return np.array(pil_to_rgb(image))
    if not isinstance(image, np.ndarray):
        if hasattr(image, "__array__") or hasattr(image, "__array_interface__"):
            image = np.asarray(image)
        else:
            raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    check_layout(image.shape)
    arr = _array_to_uint8(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 3:
        return np.ascontiguousarray(arr)
    rgb = arr[:, :, :3].astype(np.uint16)
    alpha = arr[:, :, 3:4].astype(np.uint16)
    out = (rgb * alpha + np.uint16(255) * (np.uint16(255) - alpha) + np.uint16(127)) // np.uint16(255)
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# finding images


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _has_glob_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_images(inputs: Sequence[PathLike] | PathLike, recursive: bool = False) -> list[Path]:
    """Expand files, directories and glob patterns into a list of image paths.

    * an existing **file** is taken as given (whatever its suffix — reading it will tell if it is no image);
    * a **directory** contributes its files with an image suffix (:data:`IMAGE_EXTENSIONS`, any case), sorted;
      sub-directories only with ``recursive=True``; hidden files (``.name``) are skipped;
    * anything else containing ``*``, ``?`` or ``[`` is a **glob** pattern (``**`` matches across directories);
      its matching image files, sorted.

    The expansions are concatenated in the order the inputs were given; a file reached twice (same resolved
    path) is kept at its first place only.

    Raises:
        FileNotFoundError: a path that does not exist, a glob that matches no image, or a directory without
            images — the message names the input.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        text = os.fspath(raw)
        p = Path(text).expanduser()
        if p.is_file():
            found = [p]
        elif p.is_dir():
            candidates = p.rglob("*") if recursive else p.iterdir()
            found = sorted(
                c for c in candidates
                if _is_image_file(c) and not any(part.startswith(".") for part in c.relative_to(p).parts)
            )
            if not found:
                where = " (recursively)" if recursive else ""
                raise FileNotFoundError(f"no images in {p}{where} (looked for {suffixes})")
        elif _has_glob_magic(text):
            matches = glob.glob(os.path.expanduser(text), recursive=True)
            found = sorted(Path(m) for m in matches if _is_image_file(Path(m)))
            if not found:
                what = "nothing" if not matches else "no image files"
                raise FileNotFoundError(f"glob pattern {text!r} matched {what} (looked for {suffixes})")
        else:
            raise FileNotFoundError(f"no such file or directory: {text}")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def exif_swaps_sides(img: Image.Image) -> bool:
    """True when the EXIF orientation swaps width and height (orientations 5–8)."""
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except _EXIF_ERRORS:
        return False
