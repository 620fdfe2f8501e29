"""Reference-checkpoint interop: the authors' trained heads → excelseg heads (EXCEL_SPEC §5.3 "checkpoint",
parity README §3.1 key names).

The reference saves the whole DDP state dict (``module.`` prefixes) including every frozen CLIP weight
(``encoder.*``); its trainable part is the adapter (``decoder_fts_fuse.*``) and the decoder (``decoder.*``).
:func:`import_reference_heads` reads such a file (a torch ``.pth``/``.pt`` loaded with ``weights_only=True``, or
safetensors), drops the frozen CLIP, converts every head tensor through the explicit key map of
:func:`excelseg.heads.reference_key_map` with shape checks, and refuses unknown or missing keys with their list.
:func:`save_heads` / :func:`load_heads` read and write excelseg head checkpoints (safetensors + JSON metadata).

excelseg checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) hold only the trainable heads (DESIGN
"Weights"), with in the safetensors header: ``config`` (the resolved pipeline settings as JSON), ``class_names``
(the foreground classes, label ``i + 1`` = ``class_names[i]``), ``clip_identity`` (the frozen CLIP's identity:
``sha256:<hex>`` of a weight file or ``<arch>:<tag>``) and ``clip_name``. :func:`check_checkpoint` refuses a
checkpoint used with other CLIP weights or another class list and says which differs. OpenAI's release file and
the open_clip tag ``<arch>:openai`` are the same weights (:func:`same_clip`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .heads import ExcelHeads, reference_key_map

if TYPE_CHECKING:
    from .config import PipelineConfig

__all__ = ["CheckpointError", "HeadsCheckpoint", "check_checkpoint", "convert_reference_state",
           "import_reference_heads", "load_checkpoint", "load_heads", "same_clip", "save_checkpoint", "save_heads"]

FORMAT = "excelseg-heads"
FORMAT_VERSION = "1"
FROZEN_PREFIXES = ("encoder.",)  # the reference's frozen CLIP (visual + text): never imported


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message lists the offending keys."""


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


def save_heads(path: str | os.PathLike, state: Mapping[str, Tensor], metadata: Mapping[str, object] | None = None
               ) -> Path:
    """Write a heads checkpoint (safetensors, atomically) with ``format``/``num_outputs`` and ``metadata`` (JSON
    values) in the header."""
    from safetensors.torch import save_file

    from .outputs import atomic_write

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION}
    if "decoder.classifier.weight" in state:
        meta["num_outputs"] = str(int(state["decoder.classifier.weight"].shape[0]))
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_heads(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a :func:`save_heads` checkpoint → (state dict, metadata). Refuses files of another format, truncated
    or damaged files and pickles (never unpickled) with a one-line :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an excelseg heads checkpoint (format {meta.get('format')!r}); "
                                      "convert a reference checkpoint with 'excelseg import-checkpoint'")
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first}); excelseg checkpoints are "
                              ".safetensors files; a reference .pth converts with 'excelseg import-checkpoint'"
                              ) from None


# ---- excelseg checkpoints: heads + config + class list + CLIP identity -----------------------------------------


def _openai_equivalents() -> dict[str, str]:
    """``sha256:<hex>`` of OpenAI's release files → the open_clip tag of the same weights (``<arch>:openai``)."""
    from .weights import KNOWN_FILES

    return {f"sha256:{sha}": f"{name.removesuffix('.pt')}:openai" for name, sha in KNOWN_FILES.items()}


def same_clip(a: str, b: str) -> bool:
    """Whether two CLIP identities name the same weights (equal, or OpenAI's file and its open_clip tag)."""
    eq = _openai_equivalents()
    return eq.get(a, a) == eq.get(b, b)


@dataclass
class HeadsCheckpoint:
    """What an excelseg checkpoint holds (:func:`load_checkpoint`)."""

    state: dict[str, Tensor]  # ExcelHeads tensors (excelseg names)
    class_names: list[str]  # foreground classes; label i + 1 = class_names[i]
    clip_identity: str  # identity of the frozen CLIP the heads were trained (or imported) for
    config: PipelineConfig  # the resolved settings stored with the heads
    meta: dict[str, str]  # the raw header
    path: Path | None = None

    @property
    def num_outputs(self) -> int:
        return int(self.state["decoder.classifier.weight"].shape[0])

    def heads(self) -> ExcelHeads:
        """:class:`~excelseg.heads.ExcelHeads` of the stored geometry with the stored tensors (eval mode)."""
        hc = self.config.heads
        layers = sum(1 for k in self.state if k.startswith("adapter.mlps.") and k.endswith(".fc1.weight"))
        in_dim = int(self.state["adapter.mlps.0.fc1.weight"].shape[1])
        depth = sum(1 for k in self.state if k.startswith("decoder.blocks.") and k.endswith(".ln_1.weight"))
        heads = ExcelHeads(self.num_outputs, layers, in_dim, hc.dim, hc.decoder_heads, depth, hc.dropout)
        try:
            heads.load_state_dict(self.state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: tensors do not fit the heads: {str(exc).splitlines()[0]}") from None
        return heads.eval()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Tensor], *, class_names, clip_identity: str,
                    config: PipelineConfig | None = None, clip_name: str | None = None,
                    metadata: Mapping[str, object] | None = None) -> Path:
    """Write an excelseg checkpoint: the heads' tensors (safetensors, atomically) with the resolved ``config``,
    the ``class_names`` and the CLIP identity in the header (plus any ``metadata``)."""
    from ._version import __version__
    from .config import PAPER_VOC, config_to_dict

    names = [str(n) for n in class_names]
    outputs = int(state["decoder.classifier.weight"].shape[0])
    if outputs != len(names) + 1:
        raise ValueError(f"the decoder has {outputs} outputs but {len(names)} class names were given "
                         f"(expected {outputs - 1} + background)")
    meta = {"class_names": names, "clip_identity": str(clip_identity), "excelseg_version": __version__,
            "config": config_to_dict(config if config is not None else PAPER_VOC)}
    if clip_name:
        meta["clip_name"] = clip_name
    return save_heads(path, state, {**meta, **(metadata or {})})


def load_checkpoint(path: str | os.PathLike) -> HeadsCheckpoint:
    """Read a :func:`save_checkpoint` file; refuses other formats, damaged files and incomplete headers."""
    from .config import ConfigError, config_from_dict

    path = Path(path)
    state, meta = load_heads(path)
    missing = [k for k in ("class_names", "clip_identity", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: the header lacks {', '.join(missing)}; re-create it with "
                              "'excelseg import-checkpoint' (or the trainer)")
    try:
        names = json.loads(meta["class_names"])
        config = config_from_dict(json.loads(meta["config"]), source=f"{path} (config)")
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names must be a JSON list of names")
    if "decoder.classifier.weight" not in state:
        raise CheckpointError(f"{path}: no decoder.classifier.weight (not a heads checkpoint)")
    ckpt = HeadsCheckpoint(state, names, meta["clip_identity"], config, meta, path)
    if ckpt.num_outputs != len(names) + 1:
        raise CheckpointError(f"{path}: the decoder has {ckpt.num_outputs} outputs but the header lists "
                              f"{len(names)} classes")
    return ckpt


def check_checkpoint(ckpt: HeadsCheckpoint, clip_identity: str | None = None, class_names=None) -> None:
    """Refuse ``ckpt`` for other CLIP weights or another class list, saying which differs.

    Args:
        clip_identity: identity of the CLIP in use (``LoadedClip.identity``); None: not checked.
        class_names: the classes asked for (order matters: label i + 1 = class i); None: not checked.
    """
    where = ckpt.path or "checkpoint"
    if clip_identity is not None and not same_clip(ckpt.clip_identity, clip_identity):
        raise CheckpointError(f"{where} was made with CLIP {ckpt.clip_identity}, but the CLIP in use is "
                              f"{clip_identity}; load the CLIP it was trained with (--clip)")
    if class_names is not None:
        ours, theirs = [str(n) for n in class_names], ckpt.class_names
        if ours != theirs:
            extra = [n for n in ours if n not in theirs]
            lacking = [n for n in theirs if n not in ours]
            detail = []
            if extra:
                detail.append(f"not in the checkpoint: {', '.join(extra[:10])}")
            if lacking:
                detail.append(f"missing here: {', '.join(lacking[:10])}")
            if not detail:
                first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                detail.append(f"same names in another order (class {first + 1}: {ours[first]!r} here, "
                              f"{theirs[first]!r} in the checkpoint)")
            raise CheckpointError(f"{where} was trained for {len(theirs)} classes ({', '.join(theirs[:5])}"
                                  f"{', …' if len(theirs) > 5 else ''}) but {len(ours)} classes are in use; "
                                  + "; ".join(detail))


def source_sha256(path: str | os.PathLike) -> str:
    return _file_sha256(Path(path))
