"""Writing files atomically, and reading back what excelseg wrote: palette masks, images, arrays, JSON.

Every writer goes through :func:`atomic_write`: the data is written to a hidden temporary file in the destination
directory, fsynced and renamed over the destination, so an interrupted batch never leaves a half-written output
(DESIGN.md, Conventions); :func:`remove_stale_temps` deletes what a killed process left. An existing file is a
complete file.

Masks are palette ("P" mode) PNGs with the PASCAL VOC palette (:data:`excelseg.io.palette.VOC_PALETTE`; index =
class id, 255 = ignore).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._messages import one_line
from .images import ImageReadError, PathLike, to_rgb_array
from .palette import VOC_PALETTE

__all__ = [
    "atomic_path",
    "atomic_write",
    "read_label_png",
    "remove_stale_temps",
    "save_jpeg",
    "save_json",
    "save_label_png",
    "save_npz",
    "save_png",
]


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
