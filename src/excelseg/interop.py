"""Reference-checkpoint interop: the authors' trained heads → excelseg heads (EXCEL_SPEC §5.3 "checkpoint",
parity README §3.1 key names).

The reference saves the whole DDP state dict (``module.`` prefixes) including every frozen CLIP weight
(``encoder.*``); its trainable part is the adapter (``decoder_fts_fuse.*``) and the decoder (``decoder.*``).
:func:`import_reference_heads` reads such a file (a torch ``.pth``/``.pt`` loaded with ``weights_only=True``, or
safetensors), drops the frozen CLIP, converts every head tensor through the explicit key map of
:func:`excelseg.heads.reference_key_map` with shape checks, and refuses unknown or missing keys with their list.
The result is written in excelseg's own format (:mod:`excelseg.io.checkpoint`); this module converts, nothing else.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ._deprecated import moved, names_of
from .heads import ExcelHeads, reference_key_map
from .io.checkpoint import CheckpointError

__all__ = ["CheckpointError", "convert_reference_state", "import_reference_heads", "source_sha256"]

FROZEN_PREFIXES = ("encoder.",)  # the reference's frozen CLIP (visual + text): never imported


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: not a readable torch state dict with weights_only=True "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def convert_reference_state(state: Mapping[str, Tensor], num_classes: int | None = None,
                            heads: ExcelHeads | None = None) -> dict[str, Tensor]:
    """Reference state dict → :class:`~excelseg.heads.ExcelHeads` state dict.

    Args:
        state: reference tensors; ``module.`` prefixes (DDP) are stripped, ``encoder.*`` (frozen CLIP) dropped.
        num_classes: expected foreground classes C (the decoder has C + 1 outputs); default: from the file.
        heads: the target module whose shapes are checked (default ``ExcelHeads(C + 1)``, ViT-B/16 geometry).

    Raises:
        CheckpointError: unknown keys, missing keys or shape mismatches (each listed).
    """
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    kept = {k: v for k, v in stripped.items() if not k.startswith(FROZEN_PREFIXES)}
    if heads is None:
        pred = kept.get("decoder.linear_pred.weight")
        if pred is None:
            raise CheckpointError("missing key decoder.linear_pred.weight (is this an ExCEL checkpoint?)")
        outputs = int(pred.shape[0])
        if num_classes is not None and outputs != num_classes + 1:
            raise CheckpointError(f"decoder.linear_pred.weight has {outputs} outputs; expected {num_classes + 1} "
                                  f"for {num_classes} classes")
        heads = ExcelHeads(outputs)
    target = heads.state_dict()
    key_map = reference_key_map(heads.adapter.num_layers, len(heads.decoder.blocks))
    if set(key_map.values()) != set(target):
        raise CheckpointError("internal key map does not cover the heads: "
                              f"{_listing(set(target) ^ set(key_map.values()))}")
    unknown = set(kept) - set(key_map)
    missing = set(key_map) - set(kept)
    errors = []
    if unknown:
        errors.append(f"{len(unknown)} unknown key(s): {_listing(unknown)}")
    if missing:
        errors.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    shapes = [f"{k} {tuple(kept[k].shape)} (expected {tuple(target[key_map[k]].shape)})"
              for k in sorted(set(kept) & set(key_map)) if kept[k].shape != target[key_map[k]].shape]
    if shapes:
        errors.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:20])}")
    if errors:
        raise CheckpointError("cannot import reference heads: " + " | ".join(errors))
    return {key_map[k]: v.detach().to(torch.float32).contiguous() for k, v in kept.items()}


def import_reference_heads(path: str | os.PathLike, num_classes: int | None = None) -> dict[str, Tensor]:
    """Read a reference checkpoint (``.pth``/``.pt`` DDP state dict or ``.safetensors``) → heads state dict.

    See :func:`convert_reference_state` for the rules; file errors name the file.
    """
    path = Path(path)
    try:
        return convert_reference_state(_read_state(path), num_classes)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_sha256(path: str | os.PathLike) -> str:
    return _file_sha256(Path(path))


# excelseg's own checkpoint format moved to excelseg.io.checkpoint (old paths kept for one release)
__getattr__ = moved(__name__, names_of("excelseg.io.checkpoint", """FORMAT FORMAT_VERSION HeadsCheckpoint
    check_checkpoint load_checkpoint load_heads same_clip save_checkpoint save_heads"""))
