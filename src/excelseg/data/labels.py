"""Image-level labels the way the WSSS field makes them: VOC XML annotations and ready-made label files.

* :func:`read_voc_annotation`: the classes of one ``Annotations/<id>.xml`` — every ``<object>``'s own ``<name>``
  that is one of the 20 VOC classes, ``difficult`` and ``truncated`` objects included, part names
  (``<object><part><name>head</name></part></object>``) ignored. This is how the field's ``cls_labels.npy`` /
  ``cls_labels_onehot.npy`` files are built (PSA, IRN, ToCo, WeCLIP, ExCEL).
* :func:`read_label_file`: a ready-made label file → ``{id: [label value, ...]}``:

  - ``.npy`` written by ``np.save(path, {id: vector})`` — a pickled dict in a 0-d object array, as the
    reference's ``datasets/voc/cls_labels_onehot.npy`` and the widely used ``cls_labels.npy``. Keys are image
    ids (``"2007_000032"``) or IRN's integer ids (``2007000032``); values are ``(C,)`` multi-hot vectors. The
    pickle is read by a restricted unpickler that rebuilds numpy arrays and scalars only and refuses every other
    global, so a crafted file cannot run code; anything but a dict of numeric vectors is refused.
  - ``.csv`` / ``.json`` of ``excelseg prepare folder`` (``image,classes`` with ``;``-separated names); the
    image column may be an id or a file name (``2007_000032.jpg``).

Label values are ``1 … C`` (``i + 1`` = ``class_names[i]``), as everywhere in excelseg.
"""

from __future__ import annotations

import os
import pickle
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..vocab import normalize_name

__all__ = ["LabelFileError", "coco_key", "read_label_file", "read_npy_dict", "read_voc_annotation", "voc_key"]


class LabelFileError(ValueError):
    """A label file cannot be used (unreadable, unsafe pickle, wrong layout, unknown classes); one-line message."""


# --------------------------------------------------------------------------------------------------------------
# VOC XML annotations


def read_voc_annotation(path: str | os.PathLike[str], class_names: Sequence[str]) -> tuple[list[int], list[str]]:
    """``(sorted label values, unknown object names)`` of a VOC annotation XML.

    Every ``<object>`` counts once per class (repeated objects give one label), whatever its ``difficult`` /
    ``truncated`` flags; only the object's direct ``<name>`` child is read, so part names (head, hand, foot)
    never count. Names are matched after stripping whitespace, case-insensitively.

    Raises:
        ValueError: the file is not well-formed XML, is not ASCII-compatible (UTF-16 / UTF-32), declares a DTD
            or entities (refused: nothing is expanded or fetched), has no ``<annotation>`` root, or holds an ``<object>`` without a ``<name>``.
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    if b"\x00" in data or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError("not ASCII / UTF-8 XML (UTF-16 and UTF-32 are refused)")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:  # ASCII-compatible text: a byte search finds them
        raise ValueError("declares a DTD or entities (refused)")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"not well-formed XML ({exc})") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, not <annotation>")
    lookup = {n.lower(): i + 1 for i, n in enumerate(class_names)}
    values: set[int] = set()
    unknown: list[str] = []
    for k, obj in enumerate(root.findall("object")):
        name = obj.find("name")
        if name is None or not (name.text or "").strip():
            raise ValueError(f"<object> number {k + 1} has no <name>")
        text = name.text.strip()
        if text.lower() in lookup:
            values.add(lookup[text.lower()])
        elif text not in unknown:
            unknown.append(text)
    return sorted(values), unknown


# --------------------------------------------------------------------------------------------------------------
# pickled dicts in .npy files


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled dict of arrays / scalars needs, under their numpy-1 and numpy-2 names."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    scalar = np.float32(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays, dtypes and scalars and refuses every other global."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays and scalars "
                                         "are allowed in a label file") from None


def read_npy_dict(path: str | os.PathLike[str]) -> dict[Any, Any]:
    """The dict stored by ``np.save(path, {key: value})``, read without executing arbitrary pickles.

    The npy header must describe a 0-d object array; its pickle is read by an unpickler that accepts numpy
    arrays, dtypes and scalars only (plus plain Python containers, numbers and strings).

    Raises:
        LabelFileError: not an npy file, not a pickled 0-d object array, a forbidden global in the pickle (e.g.
            ``os.system``), a truncated pickle, or the stored object is not a dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels file not found: {p}")
    fmt = np.lib.format
    with open(p, "rb") as fh:
        try:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise LabelFileError(f"{p}: npy format version {version[0]}.{version[1]} is not supported")
        except LabelFileError:
            raise
        except Exception as exc:  # noqa: BLE001 (any header error: one message)
            raise LabelFileError(f"{p}: not a valid .npy file ({exc})") from None
        if not dtype.hasobject or shape != ():
            raise LabelFileError(f"{p}: holds a {dtype} array of shape {shape}, not a dict saved with "
                                 "np.save(path, {id: vector})")
        try:
            obj = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise LabelFileError(f"{p}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (truncated / corrupt pickle)
            raise LabelFileError(f"{p}: cannot read the pickled object ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype.hasobject:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise LabelFileError(f"{p}: holds a {type(obj).__name__}, not a dict {{id: vector}}")
    return obj


def voc_key(key: Any) -> str:
    """VOC image id of a label-file key: ``"2007_000032"`` as is, IRN's integer ``2007000032`` decoded."""
    if isinstance(key, bytes):
        key = key.decode("latin1")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}" if len(s) > 4 else s
    if isinstance(key, str):
        return PurePosixPath(key.strip()).stem if key.strip().lower().endswith((".jpg", ".png")) else key.strip()
    raise LabelFileError(f"label-file key {key!r} is not an image id")


def coco_key(key: Any) -> str:
    """COCO image id (12 digits) of a label-file key: ``"COCO_train2014_000000000009"``, ``"000000000009.jpg"``,
    ``9``."""
    if isinstance(key, bytes):
        key = key.decode("latin1")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return f"{int(key):012d}"
    if isinstance(key, str):
        m = re.search(r"(\d+)(\.\w+)?$", key.strip())
        if m:
            return f"{int(m.group(1)):012d}"
    raise LabelFileError(f"label-file key {key!r} is not a COCO image id")


def _vector_labels(p: Path, data: Mapping[Any, Any], num_classes: int,
                   key_fn: Callable[[Any], str]) -> dict[str, list[int]]:
    labels: dict[str, list[int]] = {}
    for key, value in data.items():
        name = key_fn(key)
        try:
            vec = np.asarray(value)
        except Exception:  # noqa: BLE001
            vec = np.asarray([None])
        if vec.dtype.kind not in "biuf":
            raise LabelFileError(f"{p}: the value of {name!r} is not a numeric vector ({type(value).__name__})")
        vec = vec.reshape(-1) if vec.ndim == 2 and 1 in vec.shape else vec
        if vec.shape != (num_classes,):
            raise LabelFileError(f"{p}: the vector of {name!r} has shape {tuple(vec.shape)}; expected "
                                 f"({num_classes},) (one entry per foreground class)")
        if not np.isin(vec, (0, 1)).all():
            raise LabelFileError(f"{p}: the vector of {name!r} holds values other than 0 and 1")
        if name in labels:
            raise LabelFileError(f"{p}: image {name!r} appears twice")
        labels[name] = [int(i) + 1 for i in np.flatnonzero(vec)]
    return labels


def read_label_file(
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    key_fn: Callable[[Any], str] = voc_key,
    prompt_names: Sequence[str] = (),
) -> dict[str, list[int]]:
    """``{id: sorted label values}`` from a ``.npy`` dict, or a ``.csv`` / ``.json`` of ``prepare folder``.

    Args:
        path: the label file.
        class_names: foreground class names; an npy vector must have ``len(class_names)`` entries in this order.
        key_fn: maps a file key (npy key, or the image column of a CSV / JSON) to the image id.
        prompt_names: further accepted spellings of the classes in a CSV / JSON (same order).

    Raises:
        FileNotFoundError: no such file.
        LabelFileError: unsafe or malformed npy, wrong vector length, unknown class names (each named with its
            line), an image listed twice, an unsupported suffix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"labels file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _vector_labels(p, read_npy_dict(p), len(class_names), key_fn)
    if suffix not in (".csv", ".json", ".txt"):
        raise LabelFileError(f"{p}: unsupported labels file (use .npy, .csv or .json)")
    from .folder import read_labels_file

    lookup: dict[str, int] = {}
    for i, n in enumerate(class_names):
        lookup.setdefault(normalize_name(n), i + 1)
        lookup.setdefault(normalize_name(n).replace(" ", ""), i + 1)
    for i, n in enumerate(prompt_names):
        lookup.setdefault(normalize_name(n), i + 1)
    try:
        rows = read_labels_file(p)
    except ValueError as exc:
        raise LabelFileError(str(exc)) from None
    unknown = [f"{t!r} (line {line})" for _, tags, line in rows for t in tags if normalize_name(t) not in lookup]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", … ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise LabelFileError(f"{p}: unknown class names {shown}")
    labels: dict[str, list[int]] = {}
    for image, tags, line in rows:
        name = key_fn(image)
        if name in labels:
            raise LabelFileError(f"{p}:{line}: image {name!r} appears twice")
        labels[name] = sorted({lookup[normalize_name(t)] for t in tags})
    return labels
