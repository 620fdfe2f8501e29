"""Weight file formats: the OpenAI TorchScript archive, torch state dicts (``weights_only``), safetensors, and the
open_clip config stored in safetensors metadata or a sibling JSON file."""

from __future__ import annotations

import json
import logging
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._messages import one_line
from .base import _CONFIG_METADATA_KEYS, _MAX_LISTED, _OPENAI_INT_KEYS, WeightsFormatError

_logger = logging.getLogger(__name__)

HUB_CONFIG_NAME = "open_clip_config.json"  # a Hugging Face repository's open_clip config (also read as a sibling)


# ------------------------------------------------------------------------------------------- file reading


def _is_torchscript(names: list[str]) -> bool:
    for name in names:
        parts = name.split("/")
        if "code" in parts[:-1] or parts[-1] == "constants.pkl":
            return True
    return False


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: unwrap {"state_dict"/"model": …}, strip ``module.``."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFormatError(
            f"{path} does not hold a state dict (found {type(obj).__name__}); expected a mapping of parameter "
            "names to tensors, optionally under 'state_dict' or 'model'"
        )
    sd = {str(k): v for k, v in obj.items() if k not in _OPENAI_INT_KEYS}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFormatError(f"{path}: entries {bad[:_MAX_LISTED]} of the state dict are not tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise WeightsFormatError(f"{path} is empty (0 bytes): an interrupted download or copy? Get it again")
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsFormatError(f"{path} is a truncated or corrupt zip archive ({e}); get it again") from e
        if _is_torchscript(names):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                    module = torch.jit.load(str(path), map_location="cpu")
            except Exception as e:
                raise WeightsFormatError(f"{path} is a TorchScript archive that cannot be read: {e}") from e
            return _unwrap(dict(module.state_dict()), path)
    elif head[:1] != b"\x80":  # neither a zip nor a pickle (legacy torch.save)
        raise WeightsFormatError(f"{path} is not a PyTorch checkpoint (truncated, corrupt or another format)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Unsupported global" in msg or "Unsupported class" in msg:
            found = re.search(r"GLOBAL (\S+)", msg)
            what = f" (it contains {found.group(1)})" if found else ""
            raise WeightsFormatError(
                f"{path} is not a plain tensor checkpoint{what} and will not be unpickled, because unpickling "
                "can run arbitrary code. Re-save only the weights: torch.save(model.state_dict(), path) or "
                "safetensors"
            ) from e
        raise WeightsFormatError(
            f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt?): {one_line(e)}"
        ) from e
    return _unwrap(obj, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return dict(load_file(str(path), device="cpu")), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _parse_config(raw: Any, where: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(model config, preprocess config) from an open_clip config (``{"model_cfg": …}`` or the model cfg)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise WeightsFormatError(f"{where}: the open_clip config is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        return None
    model_cfg = raw.get("model_cfg", raw)
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        return None
    return dict(model_cfg), dict(raw.get("preprocess_cfg") or {})


def _find_config(path: Path, meta: Mapping[str, str]) -> tuple[dict, dict, str] | None:
    for key in _CONFIG_METADATA_KEYS:
        if key in meta:
            parsed = _parse_config(meta[key], f"{path} metadata {key!r}")
            if parsed is not None:
                return (*parsed, f"metadata {key!r}")
    for sibling in (path.with_name(path.name + ".json"), path.with_suffix(".json"),
                    path.with_name(HUB_CONFIG_NAME)):
        if sibling.is_file():
            try:
                raw = json.loads(sibling.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsFormatError(f"{sibling}: cannot read the open_clip config next to {path} ({e})") from e
            parsed = _parse_config(raw, str(sibling))
            if parsed is not None:
                return (*parsed, str(sibling))
            _logger.debug("ignoring %s: not an open_clip model config", sibling)
    return None


def _strip_text_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CustomTextCLIP layout (``text.*``) of a standard text tower -> CLIP layout."""
    if "text_projection" in sd or "text.token_embedding.weight" not in sd:
        return sd
    return {k.removeprefix("text."): v for k, v in sd.items()}
