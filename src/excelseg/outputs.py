"""Everything excelseg writes, and reading back what it wrote: atomic files, palette masks, CAM archives, resume.

Every writer goes through :func:`atomic_write`: the data is written to a hidden temporary file in the destination
directory, fsynced and renamed over the destination, so an interrupted batch never leaves a half-written output
(DESIGN.md, Conventions); :func:`remove_stale_temps` deletes what a killed process left, and :func:`is_done`
tells a re-run which images are finished (an existing file is a complete file).

Masks are palette ("P" mode) PNGs with the PASCAL VOC palette (:data:`VOC_PALETTE`; index = class id, 255 =
ignore). Per-image outputs of the training-free commands (``cam``, ``pseudo-label``, ``demo``)::

    <stem>.png            palette pseudo-label (0 = background, i = i-th class of the vocabulary)
    <stem>_overlay.jpg    (``cam``, ``demo``) the image with label colours and a legend, then one heat-map per class
    <stem>_cams.npz       (``--save-cams``) the CAM archive, one format for every command:

        cams         (K, h, w) float16 in [0, 1]: the refined CAMs of the K present classes, at full size or
                     reduced (the patch grid: 20×20 for a 320 input; or longer side N) — see :func:`cam_archive`
        class_ids    (K,) int64 label values (vocabulary index + 1)
        class_names  (K,) str
        size         (2,) int64 original image (H, W)

A 20×20 archive holds K × 800 bytes of CAMs before compression instead of K × H × W × 2 bytes at full size
(≈ 375 kB per class for a 500×375 image). :func:`read_cam_archive` upsamples bilinearly to the original size,
which from a grid archive is exactly how :attr:`excelseg.predictor.CamResult.cams` is made (up to float16
rounding); ``excelseg eval-cams`` reads every archive through it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .images import ImageReadError, PathLike, one_line, to_rgb_array

if TYPE_CHECKING:
    from .predictor import CamResult

__all__ = [
    "CAM_SIZE_RANGE",
    "IGNORE_INDEX",
    "VOC_PALETTE",
    "atomic_path",
    "atomic_write",
    "cam_archive",
    "cam_size_for",
    "cams_path",
    "is_done",
    "label_path",
    "overlay_path",
    "parse_cam_size",
    "read_cam_archive",
    "read_label_png",
    "remove_stale_temps",
    "save_jpeg",
    "save_json",
    "save_label_png",
    "save_npz",
    "save_png",
    "stale_temps_of",
    "voc_palette",
    "write_outputs",
    "write_result",
]

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------------------------
# palette


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(n, 3)`` uint8.

    Colour of index ``i``: the bits of ``i`` are dealt out three at a time (bit 0 → red, bit 1 → green,
    bit 2 → blue, then the next three bits, …), each triple landing one bit lower in the colour bytes, starting
    at bit 7. Index 1 → (128, 0, 0), 15 → (192, 128, 128), 255 → (224, 224, 192), VOC's boundary colour.
    """
    idx = np.arange(n, dtype=np.int64)
    pal = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):  # up to 24 bits of the index, 3 per round
        shift = 3 * j
        for ch in range(3):
            bit = (idx >> (shift + ch)) & 1
            pal[:, ch] |= bit << (7 - j)
    return pal.astype(np.uint8)


#: The standard 256-entry PASCAL VOC palette, ``(256, 3)`` uint8 (read-only).
VOC_PALETTE: np.ndarray = voc_palette(256)
VOC_PALETTE.setflags(write=False)


# --------------------------------------------------------------------------------------------------------------
# atomic writing


_umask_cache: list[int] = []


def _umask() -> int:
    if not _umask_cache:
        value = None
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Umask:"):
                        value = int(line.split()[1], 8)
                        break
        except (OSError, ValueError):
            value = None
        if value is None:  # no procfs: read it the only portable way (set and restore)
            value = os.umask(0o022)
            os.umask(value)
        _umask_cache.append(value)
    return _umask_cache[0]


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary path to write instead of ``path``.

    The temporary file lives in the destination's directory (created if missing), is hidden (``.name.XXXX``)
    and keeps the destination's suffix, so writers that choose the format from the suffix still work. When the
    block ends normally the file is fsynced and atomically renamed onto ``path`` (replacing an existing file);
    if the block raises (anything, KeyboardInterrupt included) the temporary file is removed, the destination is
    left untouched and the exception propagates. The final file gets the usual permissions (0666 & ~umask, or
    those of the file it replaces).
    """
    final = Path(path)
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=f".{final.name}.", suffix=final.suffix, delete=False
    ) as fh:
        tmp = Path(fh.name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer for {final} did not create its temporary file {tmp}")
        with open(tmp, "r+b") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        try:
            mode = final.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def atomic_write(path: PathLike, writer: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``writer(tmp_path)`` writes a temporary file that replaces ``path`` on success.

    See :func:`atomic_path` for the guarantees. Returns ``Path(path)``.

    Example::

        atomic_write("out/mask.png", lambda tmp: image.save(tmp, format="PNG"))
    """
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def _label_image(label: np.ndarray) -> Image.Image:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D (H, W) array, got shape {label.shape}")
    if label.shape[0] < 1 or label.shape[1] < 1:
        raise ValueError(f"empty label of shape {label.shape}")
    if label.dtype != np.uint8:
        if label.dtype.kind not in "biu":
            raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(
                f"label values must lie in [0, 255] to fit a palette PNG; got [{label.min()}, {label.max()}]"
            )
        label = label.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(label))  # mode "L"
    img.putpalette(VOC_PALETTE.tobytes())  # → mode "P", indices unchanged
    return img


def save_label_png(path: PathLike, label: np.ndarray) -> Path:
    """Save an ``(H, W)`` class-id map (uint8; 255 = ignore) as a palette PNG with :data:`VOC_PALETTE`."""
    img = _label_image(label)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_jpeg(path: PathLike, rgb_array: np.ndarray | Image.Image, quality: int = 90) -> Path:
    """Save an image (anything :func:`to_rgb_array` accepts) as a JPEG of the given quality (1–95)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must lie in [1, 100], got {quality}")
    img = Image.fromarray(to_rgb_array(rgb_array))
    return atomic_write(path, lambda tmp: img.save(tmp, format="JPEG", quality=int(quality)))


def save_png(path: PathLike, rgb_array: np.ndarray | Image.Image) -> Path:
    """Save an image (anything :func:`to_rgb_array` accepts) as an RGB PNG."""
    img = Image.fromarray(to_rgb_array(rgb_array))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npz(path: PathLike, **arrays: Any) -> Path:
    """Save arrays with ``np.savez_compressed`` under exactly ``path`` (no ``.npz`` appended)."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, _write)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors and similar
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def save_json(path: PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Save ``obj`` as strict JSON (UTF-8, trailing newline).

    numpy scalars/arrays, torch tensors and paths are converted; NaN and ±inf are written as ``null``.
    """
    text = json.dumps(_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"

    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, _write)


def read_label_png(path: PathLike) -> np.ndarray:
    """Read a class-id mask: ``(H, W)`` uint8 palette indices ("P" PNG) or grey values ("L").

    Raises:
        ImageReadError: the file is missing or unreadable.
        ValueError: the mask is a colour (RGB/RGBA) or high-bit-depth image rather than an index image.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"cannot read label {p}: {'it is a directory' if p.is_dir() else 'no such file'}")
    try:
        with open(p, "rb") as fh, Image.open(fh) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if mode == "1":
                return np.array(img, dtype=np.uint8)
    except Exception as exc:
        raise ImageReadError(f"cannot read label {p}: {one_line(exc)}") from exc
    raise ValueError(
        f"label {p} is a {mode!r} image; class masks must be palette (P) or greyscale (L) PNGs holding class ids"
    )




def remove_stale_temps(folder: PathLike, finals: Iterable[str] | None = None) -> int:
    """Delete the hidden temporary files of :func:`atomic_path` (``.<final>.<random><suffix>``) that a killed
    process left in ``folder``; only those of the final names ``finals`` when given (so processes working on
    other shards of the same folder are safe), else every one. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    wanted = None if finals is None else set(finals)
    removed = 0
    with os.scandir(folder) as entries:
        for e in entries:
            if not e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            parts = e.name[1:].rsplit(".", 2)  # <final>.<random>.<suffix>
            if len(parts) != 3 or not parts[0].endswith("." + parts[2]):
                continue
            if wanted is None or parts[0] in wanted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    removed += 1
    return removed


# --------------------------------------------------------------------------------------------------------------
# per-image outputs and resume


OVERLAY_MAX_SIDE = 768  # overlays are for looking at: panels are bounded whatever the image size
OVERLAY_MIN_SIDE = 256
CAM_SIZE_RANGE = (4, 256)  # longer side of a reduced CAM archive


def label_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}.png"


def overlay_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}_overlay.jpg"


def cams_path(out_dir: PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}_cams.npz"


def _output_paths(out_dir: PathLike, name: str, save_cams: bool, overlay: bool) -> list[Path]:
    paths = [label_path(out_dir, name)]
    paths += [overlay_path(out_dir, name)] if overlay else []
    return paths + ([cams_path(out_dir, name)] if save_cams else [])


def is_done(out_dir: PathLike, name: str, save_cams: bool, overlay: bool = False) -> bool:
    """True when every output of ``name`` exists (atomic writes: an existing file is a complete file)."""
    return all(p.is_file() for p in _output_paths(out_dir, name, save_cams, overlay))


def stale_temps_of(out_dir: PathLike, names: Sequence[str]) -> int:
    """:func:`remove_stale_temps` for the per-image outputs of ``names`` in ``out_dir``."""
    finals = [p.name for n in names for p in _output_paths(out_dir, n, True, True)]
    return remove_stale_temps(out_dir, finals)


def parse_cam_size(text: str) -> int | str | None:
    """``--cam-size``: ``grid`` (``None``: the patch grid), ``full`` (the image size) or N, the longer side."""
    value = str(text).lower()
    if value == "grid":
        return None
    if value == "full":
        return "full"
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--cam-size must be 'grid', 'full' or an integer, got {text!r}") from None
    lo, hi = CAM_SIZE_RANGE
    if not lo <= n <= hi:
        raise ValueError(f"--cam-size must be 'grid', 'full' or between {lo} and {hi} (a reduced size keeps "
                         f"archives small), got {n}")
    return n


def cam_size_for(cam_size: int | str | None, grid: tuple[int, int], image_size: tuple[int, int]
                 ) -> tuple[int, int]:
    """Stored map size: the patch ``grid`` for ``None``, the image for ``"full"``, else the image aspect with
    longer side ``cam_size``."""
    if cam_size is None:
        return int(grid[0]), int(grid[1])
    h, w = int(image_size[0]), int(image_size[1])
    if cam_size == "full":
        return h, w
    f = int(cam_size) / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def cam_archive(result: CamResult, cam_size: int | str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a CAM archive (module docstring) for one result, stored at ``cam_size``."""
    grid = tuple(result.grid_cams.shape[-2:])
    size = cam_size_for(cam_size, grid, result.image_size)
    if size == grid:
        cams = result.grid_cams.float().clamp(0, 1).cpu().numpy()
    else:
        cams = result.cams_at(size)
    return {"cams": cams.astype(np.float16), "class_ids": np.asarray(result.class_ids, dtype=np.int64),
            "class_names": np.asarray(list(result.class_names), dtype=str),
            "size": np.asarray(result.image_size, dtype=np.int64)}


def read_cam_archive(path: PathLike, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(cams (K, H, W) float32 in [0, 1], class_ids (K,) int64)`` of an archive, bilinearly upsampled to
    ``size`` (default: the original image size recorded in the archive; archives without ``size`` are returned
    as stored)."""
    import torch
    import torch.nn.functional as F

    with np.load(path) as z:
        cams = np.asarray(z["cams"], dtype=np.float32)
        ids = np.asarray(z["class_ids"], dtype=np.int64).reshape(-1)
        stored = tuple(int(v) for v in z["size"]) if "size" in z.files else None
    target = tuple(size) if size is not None else stored
    if cams.ndim != 3 or cams.shape[0] != ids.size:
        raise ValueError(f"CAM archive {path}: cams of shape {cams.shape} for {ids.size} class_ids")
    if target is None or tuple(cams.shape[1:]) == target:
        return cams, ids
    if cams.shape[0] == 0:
        return np.zeros((0, *target), np.float32), ids
    up = F.interpolate(torch.from_numpy(cams)[None], size=target, mode="bilinear", align_corners=False)[0]
    return up.clamp_(0, 1).numpy(), ids


def write_outputs(out_dir: PathLike, name: str, label: np.ndarray, archive: dict[str, np.ndarray] | None = None
                  ) -> None:
    """Write ``<name>_cams.npz`` (when given) then ``<name>.png``, each atomically (the label last: its presence
    marks the image done)."""
    if archive is not None:
        save_npz(cams_path(out_dir, name), **archive)
    save_label_png(label_path(out_dir, name), label)


def write_result(out_dir: PathLike, name: str, rgb: np.ndarray, result: CamResult, save_cams: bool = False,
                 cam_size: int | str | None = "full") -> list[Path]:
    """The outputs of ``excelseg cam`` for one image: overlay sheet, CAM archive (with ``save_cams``), label.
    ``rgb`` is the (H, W, 3) uint8 image. Returns the paths written."""
    from .viz import overlay_sheet

    h, w = result.image_size
    f = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    if max(h, w) * f < OVERLAY_MIN_SIDE:  # tiny images are enlarged so the panels stay readable
        f = OVERLAY_MIN_SIDE / max(h, w)
    small = (max(1, round(h * f)), max(1, round(w * f)))
    rgb_s = np.asarray(Image.fromarray(rgb).resize(small[::-1], Image.BILINEAR)) if f != 1 else rgb
    lab_s = np.asarray(Image.fromarray(result.pseudo_label).resize(small[::-1], Image.NEAREST)) if f != 1 \
        else result.pseudo_label
    names = {0: "background", **dict(zip(result.class_ids, result.class_names))}
    sheet = overlay_sheet(rgb_s, lab_s, names, result.cams_at(small), list(result.class_names),
                          max_side=OVERLAY_MAX_SIDE)
    save_jpeg(overlay_path(out_dir, name), sheet)
    write_outputs(out_dir, name, result.pseudo_label, cam_archive(result, cam_size) if save_cams else None)
    return _output_paths(out_dir, name, save_cams, True)
