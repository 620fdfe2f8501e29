"""The run manifest of an output folder: what made its results, so a re-run resumes only the same run.

``<out-dir>/excelseg_run.json`` (written atomically, before the first output) holds::

    format            "excelseg-run/1"
    command           cam, segment, pseudo-label, demo, train
    excelseg_version  the version that started the run (informational: not compared)
    settings          every pipeline setting ({section: {key: value}}, as excelseg_config.yaml)
    classes, vocabulary, clip, checkpoint, tse, dataset, outputs, ...   what else decides the results:
                      class list and vocabulary (names, prompt names, background words), the identities of the
                      CLIP weights, the heads checkpoint and the bank or knowledge base (sha256 of their files),
                      and the options that decide which files are written and how

A re-run into the folder compares its own manifest with the stored one (:func:`differences`; everything but
``format`` and ``excelseg_version``): the same → finished inputs are skipped; different → the command refuses
with the differences (``--overwrite`` redoes everything and replaces the manifest). Options that do not change
any result (batch size, device, workers, shard, overlap) are not in it, so shards of one run share one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._version import __version__
from ..io.files import save_json

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "describe_differences",
    "differences",
    "file_identity",
    "make_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "excelseg_run.json"
FORMAT = "excelseg-run/1"
NOT_COMPARED = ("format", "excelseg_version")
SHOWN_DIFFERENCES = 3

_HASHES: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | os.PathLike | None) -> str | None:
    """``"sha256:<hex>"`` of a file (cached in-process by path, size and mtime); ``None`` for ``None``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = f"sha256:{digest.hexdigest()}"
    return _HASHES[key]


def tse_identity(bank: Any = None, knowledge: Any = None, clusters: Any = None) -> dict[str, Any] | None:
    """What enriches the class prompts: a bank file (its sha256), a knowledge base (a shipped name or its file's
    sha256, with the clusters asked for), or ``None`` (plain prompts)."""
    if bank is not None:
        path = Path(str(bank)).expanduser()
        return {"bank": file_identity(path) if path.is_file() else str(bank)}
    if knowledge is not None:
        path = Path(str(knowledge)).expanduser()
        return {"knowledge": file_identity(path) if path.is_file() else str(knowledge).lower(),
                "clusters": clusters}
    return None


def vocabulary_record(vocab: Any) -> dict[str, list[str]]:
    """A :class:`~excelseg.vocab.Vocabulary` as plain lists (names, prompt names, background words)."""
    return {"names": list(vocab.names), "prompt_names": list(vocab.prompt_names), "background": list(vocab.background)}


def make_manifest(command: str, cfg: Any, **fields: Any) -> dict[str, Any]:
    """The manifest of a run of ``command`` with the settings ``cfg`` (a PipelineConfig) and ``fields``."""
    from ..config import config_to_dict

    return _plain({"format": FORMAT, "command": command, "excelseg_version": __version__,
                   "settings": config_to_dict(cfg), **fields})


def _plain(obj: Any) -> Any:
    """JSON's view of ``obj`` (tuples → lists, paths → strings), so a stored manifest compares equal."""
    return json.loads(json.dumps(obj, default=str))


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The stored manifest of ``out_dir``; ``None`` when there is none. An unreadable one raises ValueError."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable run manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an excelseg run manifest (format {FORMAT})")
    return data


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    return save_json(Path(out_dir) / MANIFEST_NAME, dict(manifest), indent=1)


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, stored value, new value)]`` for every entry that differs (dotted keys: ``settings.refine.
    box_threshold``; lists compared whole), ignoring :data:`NOT_COMPARED`."""
    a = _flat({k: v for k, v in old.items() if k not in NOT_COMPARED})
    b = _flat({k: v for k, v in _plain(dict(new)).items() if k not in NOT_COMPARED})
    absent = "(absent)"
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_differences(diffs: list[tuple[str, Any, Any]], shown: int = SHOWN_DIFFERENCES) -> str:
    """``key: stored -> new; …`` for the first ``shown`` differences (``settings.`` left out of the keys)."""
    seen, unique = set(), []
    for k, a, b in diffs:  # e.g. classes, vocabulary.names and .prompt_names changing alike: shown once
        key = (_short(a, 10**6), _short(b, 10**6))
        if key not in seen:
            seen.add(key)
            unique.append((k, a, b))
    parts = [f"{k.removeprefix('settings.')}: {_short(a)} -> {_short(b)}" for k, a, b in unique[:shown]]
    more = f"; … and {len(unique) - shown} more" if len(unique) > shown else ""
    return "; ".join(parts) + more
