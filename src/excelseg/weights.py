"""CLIP loading and weight resolution: one place, a fixed order, offline-honest (DESIGN "Weights").

:func:`load_clip` turns a *spec* into a frozen, fp32, eval-mode open_clip model plus its tokenizer and
preprocessing constants (:class:`LoadedClip`). A spec is one of

* ``None`` — use the ``EXCELSEG_CLIP`` environment variable (any form below); if unset, ``"ViT-B-16"``;
* an open_clip tag — ``"ViT-B-16"`` (OpenAI weights with QuickGELU, as in the paper), ``"ViT-B-16:openai"``,
  ``"ViT-L-14:laion2b_s32b_b82k"`` (``arch:pretrained``);
* a local file — ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``: the OpenAI TorchScript archive, a plain
  state dict saved with ``torch.save`` (optionally wrapped in ``{"state_dict": …}`` / ``{"model": …}``, keys
  optionally prefixed ``module.``) or safetensors;
* ``"hf-hub:org/name"`` — an open_clip model on the Hugging Face Hub;
* a name in :data:`NAMED_WEIGHTS` — weights shipped inside the package: ``"synthetic"``, the small CLIP trained
  on generated scenes (``excelseg train-clip``), identified like any local file by its sha256.

Where weights are looked for, in order:

1. the spec: the ``spec`` argument, else ``EXCELSEG_CLIP``, else ``"ViT-B-16"``;
2. a spec that is an existing file is loaded from that file; a spec that looks like a path (has a path
   separator or a weight-file suffix) but does not exist is an error (no fallback);
3. a tag with OpenAI weights (``X`` or ``X:openai``) looks for OpenAI's file name (``ViT-B-16.pt``,
   ``ViT-B-32.pt``, ``ViT-L-14.pt``, ``ViT-L-14-336px.pt``) in ``<cache>/clip/``, then in ``~/.cache/clip/``
   (where OpenAI's ``clip`` package downloads to);
4. any tag then looks for a copy open_clip downloaded earlier into ``<cache>/open_clip/`` (no network);
   an ``hf-hub:`` id looks in huggingface_hub's own cache (no network);
5. if downloads are allowed, open_clip downloads the weights into ``<cache>/open_clip/`` (``hf-hub:`` ids
   into huggingface_hub's cache). Downloads are allowed unless ``download=False`` is passed or
   ``EXCELSEG_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` is set (``download=True`` overrides the variables);
6. otherwise :class:`WeightsNotFoundError`, naming every place looked and how to get the file.

The cache directory ``<cache>`` is the ``cache_dir`` argument, else ``EXCELSEG_CACHE``, else
``~/.cache/excelseg``.

Files named in :data:`KNOWN_FILES` (OpenAI's release) are sha256-checked before they are opened. Every local
file's sha256 becomes the weights' ``identity`` (``"sha256:<hex>"``); weights obtained through open_clip are
identified as ``"<arch>:<tag>"`` or ``"hf-hub:<id>"``. Plain checkpoints are read with
``torch.load(weights_only=True)`` only: a file that needs full unpickling is refused, never executed.

The architecture of a local file is, in order: the ``arch`` argument (an open_clip model name); a JSON open_clip
model config stored in the safetensors metadata (key ``open_clip_config`` or ``config``) or in a sibling file
(``<file>.json``, ``<stem>.json`` or ``open_clip_config.json``); else it is inferred from the state dict (OpenAI
key layout: widths, depths, patch size, grid, context length and vocabulary from the tensor shapes; attention
heads = width // 64, at least 1 — ship a config for other head counts). Files default to QuickGELU (OpenAI
style) unless ``quick_gelu`` or the config says otherwise. Loading is strict: missing or unexpected keys and
shape mismatches raise :class:`WeightsMismatchError`.

Only ViT image towers are supported (:func:`check_supported`): an open_clip ``VisionTransformer`` with standard
``ResidualAttentionBlock`` blocks, class-token pooling and no attentional pooler — any width, depth, patch size
or image size.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

__all__ = [
    "KNOWN_FILES",
    "NAMED_WEIGHTS",
    "LoadedClip",
    "UnsupportedModelError",
    "WeightsFormatError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "check_supported",
    "default_cache_dir",
    "load_clip",
]

_logger = logging.getLogger(__name__)

DEFAULT_SPEC = "ViT-B-16"  # the paper's backbone: CLIP ViT-B/16, OpenAI weights
ENV_CLIP = "EXCELSEG_CLIP"
ENV_CACHE = "EXCELSEG_CACHE"
ENV_OFFLINE = "EXCELSEG_OFFLINE"
ENV_HF_OFFLINE = "HF_HUB_OFFLINE"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
OPENAI_CLIP_DIR = "~/.cache/clip"  # download folder of OpenAI's `clip` package
OPENAI_MEAN = tuple(float(v) for v in open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD = tuple(float(v) for v in open_clip.OPENAI_DATASET_STD)
# Integer entries of OpenAI's TorchScript state dict that are not weights.
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
_CONFIG_METADATA_KEYS = ("open_clip_config", "config")
_HASH_CHUNK = 1 << 20
_MAX_LISTED = 4  # offending keys named per category in a mismatch message
# Keys whose shapes define an architecture, named first (in this order) when shapes disagree.
_DEFINING_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                  "positional_embedding", "text_projection")

#: Weights shipped with excelseg: spec name -> file inside the package (checked before open_clip tags).
NAMED_WEIGHTS: dict[str, str] = {"synthetic": "assets/synthetic_clip.safetensors"}
NAMED_CONFIGS: dict[str, str] = {"synthetic": "synthetic"}  # excelseg.config name made for each shipped model

#: OpenAI's CLIP release: file name -> sha256 (the hex string in each download URL).
KNOWN_FILES: dict[str, str] = {
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}


class UnsupportedModelError(ValueError):
    """The CLIP's image tower is not one excelseg's dense forward can run, or the architecture is unknown."""


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found for a spec; the message names every place looked and how to get them."""


class WeightsMismatchError(ValueError):
    """Weights do not fit the expected architecture, or a known file's sha256 is wrong."""


class WeightsFormatError(WeightsMismatchError):
    """A weight file is unreadable (corrupt, truncated, not a checkpoint) or would need unsafe unpickling."""


@dataclass(frozen=True)
class LoadedClip:
    """A frozen CLIP ready for excelseg.

    ``model`` is an open_clip ``CLIP`` (``CustomTextCLIP`` for some open_clip tags) in eval mode, fp32, on the
    requested device, every parameter with ``requires_grad=False``. ``tokenizer(list[str])`` returns a
    ``(n, context_length)`` LongTensor. ``mean``/``std`` are the image normalisation constants of these
    weights, in 0–1 pixel space.
    """

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str  # display name: the architecture ("ViT-B-16") or the file stem
    identity: str  # "sha256:<hex>" for local files, "<arch>:<tag>" or "hf-hub:<id>" otherwise
    source: str  # where the weights came from, for humans
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # pipeline settings made for these weights (a name or YAML path for excelseg.config.load_config): set for
    # weights trained at another input size or with other captions, e.g. the shipped synthetic CLIP; read from
    # ``preprocess_cfg["excelseg_config"]`` of the stored open_clip config. None: the paper's (voc).
    default_config: str | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the image tower was trained at."""
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---------------------------------------------------------------------------------------------- environment


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_cache_dir() -> Path:
    """``EXCELSEG_CACHE`` if set, else ``~/.cache/excelseg`` (not created)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path("~/.cache/excelseg").expanduser()


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _downloads(download: bool | None) -> tuple[bool, str]:
    """Whether downloads are allowed, and why (for messages)."""
    if download is not None:
        return bool(download), f"download={bool(download)} was passed"
    for var in (ENV_OFFLINE, ENV_HF_OFFLINE):
        if _env_flag(var):
            return False, f"{var}={os.environ[var]} is set"
    if not _hub_resolvable():
        return False, f"no network: {HUB_HOST} cannot be resolved (pass download=True to try anyway)"
    return True, "no offline switch is set"


HUB_HOST = "huggingface.co"


def _hub_resolvable(timeout: float = 3.0) -> bool:
    """Quick DNS probe so an offline machine fails at once instead of after minutes of download retries."""
    import socket
    import threading

    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(HUB_HOST, 443)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


# --------------------------------------------------------------------------------------------------- sha256

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed; cached in-process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def _check_known_hash(path: Path, sha: str) -> None:
    expected = KNOWN_FILES.get(path.name)
    if expected is not None and sha != expected.lower():
        raise WeightsMismatchError(
            f"{path} does not have the sha256 of the known file {path.name}: expected {expected}, got {sha}. "
            "The file is corrupt or incomplete (download it again), or it is a different model that shares the "
            "name (rename it)."
        )


# -------------------------------------------------------------------------------------------- support check


def _tower_kind(visual: Any) -> str:
    name = type(visual).__name__
    if name == "ModifiedResNet":
        return "ModifiedResNet (ResNet tower, e.g. RN50)"
    if name == "TimmModel":
        trunk = getattr(visual, "trunk", None)
        return f"TimmModel (timm tower {type(trunk).__name__})" if trunk is not None else "TimmModel (timm tower)"
    return name


_SUPPORTED_TEXT = (
    "excelseg supports open_clip VisionTransformer image towers built from standard ResidualAttentionBlock "
    "blocks (nn.MultiheadAttention), with class-token pooling (pool_type='tok'), no attentional pooler and "
    "final_ln_after_pool=False; any width, depth, patch size and image size work"
)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless excelseg's dense forward can run this image tower.

    ``model`` is an open_clip CLIP (its ``.visual`` is checked) or the image tower itself.
    """
    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(f"unsupported CLIP image tower {_tower_kind(visual)}: {_SUPPORTED_TEXT}")
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("it has an attentional pooler")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type={visual.pool_type!r}")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool=True")
    if getattr(visual, "proj", None) is None:
        problems.append("it has no output projection")
    if not getattr(visual.transformer, "batch_first", True):
        problems.append("its transformer is not batch-first")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            problems.append(f"block {i} is a {type(block).__name__}")
            break
        if not isinstance(block.attn, nn.MultiheadAttention):
            problems.append(f"block {i} attention is a {type(block.attn).__name__}")
            break
    if problems:
        raise UnsupportedModelError(
            f"unsupported CLIP image tower VisionTransformer ({'; '.join(problems)}): {_SUPPORTED_TEXT}"
        )


def _check_config_supported(cfg: Mapping[str, Any], what: str, *, local: bool = False) -> None:
    """Refuse unsupported towers from a model config before anything is built or downloaded.

    ``local``: the model is to be built here from a local file (no Hugging Face text towers then).
    """
    vision = cfg.get("vision_cfg") or {}
    text = cfg.get("text_cfg") or {}
    reason = None
    if "multimodal_cfg" in cfg:
        reason = "a CoCa model (image tower with attentional pooler)"
    elif vision.get("timm_model_name"):
        reason = f"a timm image tower ({vision['timm_model_name']})"
    elif isinstance(vision.get("layers"), (list, tuple)):
        reason = "a ModifiedResNet image tower (ResNet, e.g. RN50)"
    elif vision.get("attentional_pool"):
        reason = "an image tower with attentional pooling"
    elif vision.get("pool_type", "tok") != "tok":
        reason = f"an image tower with pool_type={vision['pool_type']!r}"
    elif vision.get("final_ln_after_pool"):
        reason = "an image tower with final_ln_after_pool=True"
    elif vision.get("block_type") == "custom" or any(
        vision.get(k) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                                "scale_attn", "scale_fc")
    ):
        reason = "an image tower with custom attention blocks"
    if reason is not None:
        raise UnsupportedModelError(f"{what} has {reason}: {_SUPPORTED_TEXT}")
    if local and text.get("hf_model_name"):
        raise UnsupportedModelError(
            f"{what} has a Hugging Face text tower ({text['hf_model_name']}), which needs the network to build; "
            "load such models with an open_clip tag or an hf-hub: id instead of a local file"
        )


# ----------------------------------------------------------------------------------------- architectures


def _unknown_arch(arch: str) -> UnsupportedModelError:
    names = open_clip.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
    examples = close or [n for n in ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336") if n in names]
    return UnsupportedModelError(
        f"unknown CLIP architecture {arch!r}; open_clip knows {len(names)} (open_clip.list_models()), "
        f"e.g. {', '.join(examples)}"
    )


def _arch_config(arch: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(arch) if arch in open_clip.list_models() else None
    if cfg is None:
        raise _unknown_arch(arch)
    return cfg


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _heads(width: int) -> int:
    """OpenAI/open_clip convention: 64-wide heads; at least one head, and a divisor of the width."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _infer_config(sd: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """An open_clip model config read off the shapes of an OpenAI/open_clip-layout CLIP state dict."""
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise UnsupportedModelError(
            f"{where} holds a ModifiedResNet image tower (ResNet, e.g. RN50): {_SUPPORTED_TEXT}")
    if any(k.startswith("visual.trunk.") for k in sd):
        raise UnsupportedModelError(f"{where} holds a timm image tower: {_SUPPORTED_TEXT}")
    if any(k.startswith("visual.attn_pool") for k in sd):
        raise UnsupportedModelError(f"{where} holds an image tower with attentional pooling: {_SUPPORTED_TEXT}")
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                "token_embedding.weight", "positional_embedding")
    absent = [k for k in required if k not in sd]
    if absent:
        first = ", ".join(list(sd)[:5])
        raise WeightsFormatError(
            f"{where} is not a CLIP state dict in the OpenAI/open_clip layout (no {', '.join(absent)}; "
            f"its first keys are: {first}); pass arch=<open_clip model name> or ship an open_clip config"
        )
    conv = sd["visual.conv1.weight"]
    v_width, patch = int(conv.shape[0]), (int(conv.shape[-2]), int(conv.shape[-1]))
    n_pos = int(sd["visual.positional_embedding"].shape[0])
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise WeightsFormatError(
            f"{where}: cannot infer the image size from a positional embedding of {n_pos} tokens (not a square "
            "grid plus a class token); pass arch=... or ship an open_clip config"
        )
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    v_mlp = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    vision: dict[str, Any] = {
        "layers": v_layers,
        "width": v_width,
        "head_width": v_width // _heads(v_width),
        "patch_size": patch[0] if patch[0] == patch[1] else patch,
        "image_size": grid * patch[0] if patch[0] == patch[1] else (grid * patch[0], grid * patch[1]),
        "mlp_ratio": (v_mlp.shape[0] / v_width) if v_mlp is not None else 4.0,
        "no_ln_pre": "visual.ln_pre.weight" not in sd,
    }
    if "visual.transformer.resblocks.0.ls_1.gamma" in sd:
        vision["ls_init_value"] = 1e-5  # presence only; the values come from the file
    t_width = int(sd["token_embedding.weight"].shape[1])
    t_mlp = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
    text: dict[str, Any] = {
        "context_length": int(sd["positional_embedding"].shape[0]),
        "vocab_size": int(sd["token_embedding.weight"].shape[0]),
        "width": t_width,
        "heads": _heads(t_width),
        "layers": _count_blocks(sd, "transformer.resblocks."),
        "mlp_ratio": (t_mlp.shape[0] / t_width) if t_mlp is not None else 4.0,
    }
    if "transformer.resblocks.0.ls_1.gamma" in sd:
        text["ls_init_value"] = 1e-5
    if "text_projection.weight" in sd:  # nn.Linear projection (with bias)
        embed_dim = int(sd["text_projection.weight"].shape[0])
        text["proj_bias"] = "text_projection.bias" in sd
    elif "text_projection" in sd:
        embed_dim = int(sd["text_projection"].shape[1])
    else:
        embed_dim = int(sd["visual.proj"].shape[1])
        text["proj_type"] = "none"
    cfg: dict[str, Any] = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}
    scale = sd.get("logit_scale")
    if scale is not None and scale.ndim == 1:
        cfg["nonscalar_logit_scale"] = True
    if "logit_bias" in sd:
        cfg["init_logit_bias"] = 0.0  # presence only; the value comes from the file
    return cfg


def _build(cfg: Mapping[str, Any], quick_gelu: bool, what: str) -> nn.Module:
    """An fp32 open_clip model from a model config (no I/O)."""
    _check_config_supported(cfg, what, local=True)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    kwargs["quick_gelu"] = quick_gelu
    cls = CustomTextCLIP if cfg.get("custom_text") else CLIP
    try:
        model = _instantiate(cls, kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise WeightsFormatError(f"{what}: the open_clip model config is invalid ({type(e).__name__}: {e})") from e
    check_supported(model)
    return model


# Buffers that are not saved in a state dict and that _instantiate knows how to rebuild.
_CAUSAL_MASKS = ("attn_mask", "text.attn_mask")


def _instantiate(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> nn.Module:
    """``cls(**kwargs)`` on the CPU without the random initialisation every weight file overwrites anyway.

    The model is built on the meta device and given uninitialised CPU storage. Parameters and persistent
    buffers are then set by the strict load; the only unsaved buffers open_clip's CLIP has are its causal text
    masks, rebuilt here. A model with any other unsaved buffer is built the ordinary (slower) way.
    """
    try:
        with torch.device("meta"):
            model = cls(**kwargs)
    except (RuntimeError, NotImplementedError):
        return cls(**kwargs)
    saved = model.state_dict().keys()
    unsaved = [name for name, _ in model.named_buffers() if name not in saved]
    if any(name not in _CAUSAL_MASKS for name in unsaved):
        return cls(**kwargs)
    model = model.to_empty(device="cpu")
    for name in unsaved:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        size = getattr(owner, attr).shape[-1]
        owner.register_buffer(attr, torch.full((size, size), float("-inf")).triu_(1), persistent=False)
    return model


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, arch_desc: str) -> None:
    expected = model.state_dict()
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element: same weights, harmless
        if key in sd and key in expected and sd[key].shape != expected[key].shape \
                and sd[key].numel() == expected[key].numel() == 1:
            sd[key] = sd[key].reshape(expected[key].shape)
    wrong = sorted((k for k in expected if k in sd and sd[k].shape != expected[k].shape),
                   key=lambda k: _DEFINING_KEYS.index(k) if k in _DEFINING_KEYS else len(_DEFINING_KEYS))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if wrong or missing or unexpected:
        parts = []

        def listed(keys: list[str], fmt: Callable[[str], str]) -> str:
            more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            return ", ".join(fmt(k) for k in keys[:_MAX_LISTED]) + more

        if wrong:
            parts.append(listed(wrong, lambda k: f"{k} has shape {_fmt_shape(sd[k].shape)}, "
                                                 f"expected {_fmt_shape(expected[k].shape)}"))
        if missing:
            parts.append("missing keys: " + listed(missing, lambda k: f"{k} {_fmt_shape(expected[k].shape)}"))
        if unexpected:
            parts.append("unexpected keys: " + listed(unexpected, lambda k: f"{k} {_fmt_shape(sd[k].shape)}"))
        raise WeightsMismatchError(f"weights in {path} do not match {arch_desc}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


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
            f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt?): {_one_line(e)}"
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
                    path.with_name("open_clip_config.json")):
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


@lru_cache(maxsize=8)
def _simple_tokenizer(context_length: int) -> Callable[..., torch.Tensor]:
    return open_clip.SimpleTokenizer(context_length=context_length)


def _finish(model: nn.Module, device: str | torch.device) -> nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_file(path: Path, *, device: str | torch.device, arch: str | None, quick_gelu: bool | None,
               name: str, source: str, default_config: str | None = None) -> LoadedClip:
    if not path.is_file():
        raise WeightsNotFoundError(f"no such file: {path}" if not path.exists() else f"not a file: {path}")
    sha = _sha256(path)
    _check_known_hash(path, sha)
    meta: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        sd, meta = _read_safetensors(path)
    else:
        sd = _read_torch_file(path)
    preprocess: dict[str, Any] = {}
    if arch is not None:
        cfg, arch_desc = _arch_config(arch), arch
    else:
        found = _find_config(path, meta)
        if found is not None:
            cfg, preprocess, where = found
            arch_desc = f"the open_clip config in {where}"
        else:
            sd = _strip_text_prefix(sd)
            cfg = _infer_config(sd, str(path))
            v, t = cfg["vision_cfg"], cfg["text_cfg"]
            arch_desc = (f"the architecture inferred from its shapes (ViT width {v['width']}, {v['layers']} "
                         f"layers, patch {v['patch_size']}, image {v['image_size']}; text width {t['width']}, "
                         f"{t['layers']} layers)")
            _logger.debug("inferred open_clip config for %s: %s", path, cfg)
    if quick_gelu is None:
        quick_gelu = bool(cfg.get("quick_gelu", True))
    model = _build(cfg, quick_gelu, str(path))
    if isinstance(model, CustomTextCLIP):  # text tower under `text.`
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    else:
        sd = _strip_text_prefix(sd)
    _load_strict(model, sd, path, arch_desc)
    context = int(getattr(model, "context_length", 77))
    vocab = getattr(model, "vocab_size", None)
    tokenizer = _simple_tokenizer(context)
    if vocab is not None and vocab < tokenizer.vocab_size:
        _logger.warning("%s has a %d-token vocabulary but the CLIP tokenizer has %d tokens", path, vocab,
                        tokenizer.vocab_size)
    mean = tuple(float(x) for x in preprocess.get("mean", OPENAI_MEAN))
    std = tuple(float(x) for x in preprocess.get("std", OPENAI_STD))
    _logger.info("loaded CLIP %s from %s (sha256 %s)", name, path, sha[:12])
    return LoadedClip(_finish(model, device), tokenizer, name, f"sha256:{sha}", source, mean, std,
                      default_config=preprocess.get("excelseg_config") or default_config)


# ------------------------------------------------------------------------------------ tags and the hub


def _openai_file(arch: str) -> str:
    url = open_clip.get_pretrained_url(arch, "openai")
    return url.rsplit("/", 1)[-1] if url else f"{arch}.pt"


def _hf_cached(repo_id: str, filenames: tuple[str, ...], cache_dir: Path | None) -> Path | None:
    """A file huggingface_hub already has in its cache, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except (OSError, ValueError):  # an invalid id or unreadable cache: not there
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


_HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _open_clip_cached(arch: str, tag: str, oc_cache: Path) -> tuple[Path | None, bool, list[str]]:
    """A copy of (arch, tag) that open_clip downloaded earlier into ``oc_cache``, found without the network.

    Returns (file or None, whether it is in huggingface_hub's cache layout, the places looked).
    """
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    places = []
    hub = pcfg.get("hf_hub", "")
    if hub:
        repo_id, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        names = (filename,) if filename else _HF_WEIGHT_NAMES
        if filename.endswith((".bin", ".pth")):
            names = (filename[:-4] + ".safetensors", filename)
        hit = _hf_cached(repo_id, names, oc_cache)
        if hit is not None:
            return hit, True, places
        places.append(f"open_clip cache {oc_cache} (huggingface_hub copy of {repo_id}: missing)")
    url = pcfg.get("url", "")
    if url:
        target = oc_cache / url.rsplit("/", 1)[-1]
        if target.is_file():
            return target, False, places
        places.append(f"open_clip cache file {target} (missing)")
    return None, False, places


def _tag_result(model: nn.Module, arch: str, tag: str, device: str | torch.device, source: str,
                cache: Path) -> LoadedClip:
    check_supported(model)
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    try:
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=str(cache / "open_clip"))
    except Exception as e:
        raise WeightsNotFoundError(f"the tokenizer for {arch} could not be created: {e}") from e
    mean = tuple(float(x) for x in pcfg.get("mean", OPENAI_MEAN))
    std = tuple(float(x) for x in pcfg.get("std", OPENAI_STD))
    _logger.info("loaded CLIP %s:%s from %s", arch, tag, source)
    return LoadedClip(_finish(model, device), tokenizer, arch, f"{arch}:{tag}", source, mean, std)


def _split_tag(spec: str) -> tuple[str, str | None]:
    arch, sep, tag = spec.partition(":")
    return arch.strip(), (tag.strip() or None) if sep else None


def _load_tag(spec: str, looked: list[str], *, device: str | torch.device, cache: Path,
              download: bool | None, arch_arg: str | None, quick_gelu: bool | None) -> LoadedClip:
    arch, tag = _split_tag(spec)
    if arch not in open_clip.list_models():
        raise _unknown_arch(arch)
    if arch_arg is not None and arch_arg != arch:
        raise ValueError(f"arch={arch_arg!r} contradicts the tag {spec!r}; pass one or the other")
    _check_config_supported(_arch_config(arch), arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is None:
        if "openai" not in tags:
            raise WeightsNotFoundError(
                f"{arch} has no OpenAI weights; name the pretrained weights as '{arch}:<tag>', one of: "
                f"{', '.join(tags) if tags else '(open_clip lists none)'}"
            )
        tag = "openai"
    if not open_clip.is_pretrained_cfg(arch, tag):
        raise WeightsNotFoundError(
            f"open_clip has no pretrained weights {tag!r} for {arch}; known tags: "
            f"{', '.join(tags) if tags else '(none)'}"
        )
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if quick_gelu is None:
        quick_gelu = bool(pcfg.get("quick_gelu", False))

    openai_name = None
    if tag.lower() == "openai":
        openai_name = _openai_file(arch)
        for folder in (cache / "clip", Path(OPENAI_CLIP_DIR).expanduser()):
            candidate = folder / openai_name
            if candidate.is_file():
                return _load_file(candidate, device=device, arch=None, quick_gelu=quick_gelu, name=arch,
                                  source=f"{candidate} (cached OpenAI weights for {arch})")
            looked.append(f"cache file {candidate} (missing)")

    oc_cache = cache / "open_clip"
    cached, in_hub_layout, places = _open_clip_cached(arch, tag, oc_cache)
    kwargs: dict[str, Any] = {"force_quick_gelu": True} if quick_gelu else {"quick_gelu": False}
    if cached is not None and in_hub_layout:
        try:
            model = open_clip.create_model(arch, pretrained=str(cached), pretrained_text=False, **kwargs)
        except Exception as e:
            raise WeightsMismatchError(f"open_clip could not load its cached {arch}:{tag} from {cached}: {e}") from e
        return _tag_result(model, arch, tag, device, f"{cached} (open_clip cache, {arch}:{tag})", cache)
    if cached is not None:  # a URL download: may be an OpenAI TorchScript archive, read it ourselves
        loaded = _load_file(cached, device=device, arch=arch, quick_gelu=quick_gelu, name=arch,
                            source=f"{cached} (open_clip cache, {arch}:{tag})")
        return replace(loaded, identity=f"{arch}:{tag}",
                       mean=tuple(float(x) for x in pcfg.get("mean", OPENAI_MEAN)),
                       std=tuple(float(x) for x in pcfg.get("std", OPENAI_STD)))
    looked.extend(places)

    allowed, why = _downloads(download)
    if not allowed:
        looked.append(f"open_clip download of {arch}:{tag} (disabled: {why})")
        raise WeightsNotFoundError(_not_found_message(arch, tag, looked, cache, openai_name))
    try:
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=str(oc_cache), **kwargs)
    except Exception as e:
        looked.append(f"open_clip download of {arch}:{tag} into {oc_cache} (failed: {_one_line(e)})")
        raise WeightsNotFoundError(_not_found_message(arch, tag, looked, cache, openai_name)) from e
    return _tag_result(model, arch, tag, device, f"open_clip {arch}:{tag} ({oc_cache})", cache)


def _not_found_message(arch: str, tag: str, looked: list[str], cache: Path, openai_name: str | None) -> str:
    how = (f"Allow the download (unset {ENV_OFFLINE}/{ENV_HF_OFFLINE} or pass download=True), "
           f"or pass a local file with --clip PATH / {ENV_CLIP}=PATH.")
    if openai_name is not None:
        sha = KNOWN_FILES.get(openai_name)
        url = open_clip.get_pretrained_url(arch, "openai")
        how = (f"Download {openai_name} from OpenAI's CLIP release ({url or 'github.com/openai/CLIP'}"
               f"{f', sha256 {sha}' if sha else ''}) and put it in {cache / 'clip'}{os.sep}, or pass "
               f"--clip PATH / set {ENV_CLIP}=PATH, or allow open_clip to download it (unset "
               f"{ENV_OFFLINE}/{ENV_HF_OFFLINE} or pass download=True).")
    return f"CLIP weights {arch}:{tag} not found. Looked at: {'; '.join(looked)}. {how}"


def _load_hub(spec: str, looked: list[str], *, device: str | torch.device, download: bool | None,
              quick_gelu: bool | None) -> LoadedClip:
    repo_id = spec[len("hf-hub:"):].strip()
    if not repo_id:
        raise ValueError("empty Hugging Face Hub id after 'hf-hub:'")
    kwargs: dict[str, Any] = {}
    if quick_gelu is not None:
        kwargs = {"force_quick_gelu": True} if quick_gelu else {"quick_gelu": False}

    config = _hf_cached(repo_id, ("open_clip_config.json",), None)
    weights = _hf_cached(repo_id, _HF_WEIGHT_NAMES, None) if config is not None else None
    if config is not None and weights is not None and weights.parent == config.parent:
        model_name, source = f"local-dir:{config.parent}", f"huggingface_hub cache {config.parent}"
    else:
        looked.append(f"huggingface_hub cache for {repo_id} (missing)")
        allowed, why = _downloads(download)
        if not allowed:
            looked.append(f"open_clip download of hf-hub:{repo_id} (disabled: {why})")
            raise WeightsNotFoundError(
                f"CLIP weights hf-hub:{repo_id} not found. Looked at: {'; '.join(looked)}. Allow the download "
                f"(unset {ENV_OFFLINE}/{ENV_HF_OFFLINE} or pass download=True), or download the repository's "
                f"open_clip_model.safetensors and open_clip_config.json and pass the .safetensors file with "
                f"--clip PATH / {ENV_CLIP}=PATH."
            )
        model_name, source = f"hf-hub:{repo_id}", f"Hugging Face Hub {repo_id}"
    try:
        hub_cfg = open_clip.get_model_config(model_name)
    except Exception as e:
        looked.append(f"open_clip config of {model_name} (failed: {_one_line(e)})")
        raise WeightsNotFoundError(f"CLIP weights hf-hub:{repo_id} not found. Looked at: {'; '.join(looked)}.") from e
    if hub_cfg:
        _check_config_supported(hub_cfg, f"hf-hub:{repo_id}")
    try:
        model = open_clip.create_model(model_name, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:
        looked.append(f"open_clip load of {model_name} (failed: {_one_line(e)})")
        raise WeightsNotFoundError(f"CLIP weights hf-hub:{repo_id} not found. Looked at: {'; '.join(looked)}.") from e
    check_supported(model)
    pp = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(float(x) for x in pp.get("mean", OPENAI_MEAN))
    std = tuple(float(x) for x in pp.get("std", OPENAI_STD))
    _logger.info("loaded CLIP hf-hub:%s from %s", repo_id, source)
    return LoadedClip(_finish(model, device), tokenizer, repo_id, f"hf-hub:{repo_id}", source, mean, std)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec or "\\" in spec or os.sep in spec or spec.startswith("~")
        or spec.lower().endswith(WEIGHT_SUFFIXES)
    )


# ------------------------------------------------------------------------------------------------- entry


def load_clip(
    spec: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    arch: str | None = None,
    quick_gelu: bool | None = None,
) -> LoadedClip:
    """Resolve ``spec`` to CLIP weights and return the frozen model, tokenizer and preprocessing constants.

    Args:
        spec: an open_clip tag (``"ViT-B-16"``, ``"ViT-L-14:laion2b_s32b_b82k"``), a local weight file, or
            ``"hf-hub:org/name"``; ``None`` reads ``EXCELSEG_CLIP`` and falls back to ``"ViT-B-16"``
            (see the module docstring for the full search order).
        device: where the model goes; it is always fp32.
        cache_dir: overrides ``EXCELSEG_CACHE`` / ``~/.cache/excelseg``.
        download: allow (True) or forbid (False) downloads; ``None`` allows them unless ``EXCELSEG_OFFLINE=1``
            or ``HF_HUB_OFFLINE=1``.
        arch: for local files, the open_clip architecture name to build instead of reading the config
            from the file or inferring it.
        quick_gelu: QuickGELU activations; ``None``: True for local files unless their config says otherwise,
            the pretrained tag's setting for open_clip tags.

    Raises:
        WeightsNotFoundError: nothing found (the message lists every place looked and how to get the weights).
        WeightsMismatchError: wrong sha256 for a known file, or weights that do not fit the architecture
            (:class:`WeightsFormatError` for unreadable files and checkpoints that would need unpickling).
        UnsupportedModelError: unknown architecture, or an image tower excelseg cannot run.
    """
    env = os.environ.get(ENV_CLIP, "").strip()
    if spec is not None and str(spec).strip():
        text, origin = str(spec).strip(), "the explicit argument"
        if env:
            origin += f" ({ENV_CLIP}={env} was not used)"
    elif env:
        text, origin = env, f"{ENV_CLIP}"
    else:
        text, origin = DEFAULT_SPEC, f"the default ({ENV_CLIP} is not set)"
    looked = [f"spec {text!r} from {origin}"]
    cache = _cache_root(cache_dir)
    _logger.debug("resolving CLIP spec %r from %s; cache %s", text, origin, cache)

    if text.startswith("hf-hub:"):
        if arch is not None:
            raise ValueError(f"arch={arch!r} applies to local files; an hf-hub: id carries its own config")
        return _load_hub(text, looked, device=device, download=download, quick_gelu=quick_gelu)
    path = Path(text).expanduser()
    if path.is_file():
        return _load_file(path, device=device, arch=arch, quick_gelu=quick_gelu, name=path.stem,
                          source=f"{path} (from {origin})")
    if text.lower() in NAMED_WEIGHTS:
        shipped = Path(__file__).resolve().parent / NAMED_WEIGHTS[text.lower()]
        if not shipped.is_file():
            raise WeightsNotFoundError(f"the shipped weights {text!r} are missing from the installation: {shipped}")
        return _load_file(shipped, device=device, arch=arch, quick_gelu=quick_gelu, name=text.lower(),
                          source=f"{shipped} (shipped weights {text.lower()!r}, from {origin})",
                          default_config=NAMED_CONFIGS.get(text.lower()))
    tag_text = text
    if _looks_like_path(text):
        arch_part = _split_tag(text.replace("/", "-"))[0]
        if path.exists():
            raise WeightsNotFoundError(
                f"not a weight file: {path} (from {origin}); pass a .pt/.pth/.bin/.safetensors file")
        if "/" in text and not text.startswith(("/", ".", "~")) and arch_part in open_clip.list_models():
            tag_text = text.replace("/", "-")  # OpenAI spelling, e.g. "ViT-B/16"
        else:
            raise WeightsNotFoundError(f"no such file: {path} (from {origin})")
    return _load_tag(tag_text, looked, device=device, cache=cache, download=download, arch_arg=arch,
                     quick_gelu=quick_gelu)
