"""excelseg's own checkpoint format: the trainable heads (safetensors) with their settings, classes and CLIP.

:func:`save_heads` / :func:`load_heads` read and write head tensors with JSON metadata in the safetensors header
(``format`` ``excelseg-heads``). excelseg checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) hold
only the trainable heads (DESIGN "Weights"), with in the safetensors header: ``config`` (the resolved pipeline settings as JSON), ``class_names``
(the foreground classes, label ``i + 1`` = ``class_names[i]``), ``clip_identity`` (the frozen CLIP's identity:
``sha256:<hex>`` of a weight file or ``<arch>:<tag>``) and ``clip_name``. :func:`check_checkpoint` refuses a
checkpoint used with other CLIP weights or another class list and says which differs. OpenAI's release file and
the open_clip tag ``<arch>:openai`` are the same weights (:func:`same_clip`).

Converting the authors' checkpoints into this format is :mod:`excelseg.interop`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from ..heads import ExcelHeads
from .files import atomic_write

if TYPE_CHECKING:
    from ..config import PipelineConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "HeadsCheckpoint", "check_checkpoint", "load_checkpoint",
           "load_heads", "same_clip", "save_checkpoint", "save_heads"]

FORMAT = "excelseg-heads"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or used here; the message says which and why."""


def save_heads(path: str | os.PathLike, state: Mapping[str, Tensor], metadata: Mapping[str, object] | None = None
               ) -> Path:
    """Write a heads checkpoint (safetensors, atomically) with ``format``/``num_outputs`` and ``metadata`` (JSON
    values) in the header."""
    from safetensors.torch import save_file

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
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (excelseg checkpoints are .safetensors "
                              "files, e.g. a run's checkpoints/iter_NNNNNN.safetensors)")
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


def _openai_equivalents() -> dict[str, str]:
    """``sha256:<hex>`` of OpenAI's release files → the open_clip tag of the same weights (``<arch>:openai``)."""
    from ..weights import KNOWN_FILES

    return {f"sha256:{sha}": f"{name.removesuffix('.pt')}:openai" for name, sha in KNOWN_FILES.items()}


def named_clips() -> dict[str, str]:
    """Identities (``sha256:<hex>``) of the CLIP weights shipped with excelseg → their ``--clip`` name."""
    from pathlib import Path as _Path

    from ..weights import base

    root = _Path(base.__file__).resolve().parents[1]
    return {f"sha256:{base.file_sha256(root / rel)}": name for name, rel in base.NAMED_WEIGHTS.items()
            if (root / rel).is_file()}


def clip_spec_of(identity: str) -> str | None:
    """The ``--clip`` value that loads the CLIP of ``identity``: a shipped name (``synthetic``), an open_clip tag
    as recorded; ``None`` for other weight files (only their sha256 is known)."""
    named = named_clips().get(identity)
    if named is not None:
        return named
    return None if identity.startswith("sha256:") else identity


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
    from .._version import __version__
    from ..config import PAPER_VOC, config_to_dict

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
    from ..config import ConfigError, config_from_dict

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
        named = named_clips()
        if ckpt.clip_identity in named:
            raise CheckpointError(f"{where}: these heads were made with the shipped {named[ckpt.clip_identity]} "
                                  f"CLIP: add --clip {named[ckpt.clip_identity]} (the CLIP in use is "
                                  f"{named.get(clip_identity, clip_identity)})")
        raise CheckpointError(f"{where} was made with CLIP {ckpt.clip_identity}, but the CLIP in use is "
                              f"{named.get(clip_identity, clip_identity)}; load the CLIP it was trained with "
                              "(--clip)")
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
