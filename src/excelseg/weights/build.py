"""Building an open_clip model for a config (given, found or inferred from the state dict's shapes) and loading
the weights strictly, with messages that name every mismatching key."""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from . import base
from .base import LoadedClip, UnsupportedModelError, WeightsFormatError
from .formats import HUB_CONFIG_NAME, _find_config, _read_safetensors, _read_torch_file, _strip_text_prefix

_logger = logging.getLogger(__name__)


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
            f"{where} holds a ModifiedResNet image tower (ResNet, e.g. RN50): {base._SUPPORTED_TEXT}")
    if any(k.startswith("visual.trunk.") for k in sd):
        raise UnsupportedModelError(f"{where} holds a timm image tower: {base._SUPPORTED_TEXT}")
    if any(k.startswith("visual.attn_pool") for k in sd):
        raise UnsupportedModelError(f"{where} holds an image tower with attentional pooling: {base._SUPPORTED_TEXT}")
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
    base._check_config_supported(cfg, what, local=True)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    kwargs["quick_gelu"] = quick_gelu
    cls = CustomTextCLIP if cfg.get("custom_text") else CLIP
    try:
        model = _instantiate(cls, kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise WeightsFormatError(f"{what}: the open_clip model config is invalid ({type(e).__name__}: {e})") from e
    base.check_supported(model)
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
                   key=lambda k: base._DEFINING_KEYS.index(k) if k in base._DEFINING_KEYS else len(base._DEFINING_KEYS))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if wrong or missing or unexpected:
        parts = []

        def listed(keys: list[str], fmt: Callable[[str], str]) -> str:
            more = f" (and {len(keys) - base._MAX_LISTED} more)" if len(keys) > base._MAX_LISTED else ""
            return ", ".join(fmt(k) for k in keys[:base._MAX_LISTED]) + more

        if wrong:
            parts.append(listed(wrong, lambda k: f"{k} has shape {_fmt_shape(sd[k].shape)}, "
                                                 f"expected {_fmt_shape(expected[k].shape)}"))
        if missing:
            parts.append("missing keys: " + listed(missing, lambda k: f"{k} {_fmt_shape(expected[k].shape)}"))
        if unexpected:
            parts.append("unexpected keys: " + listed(unexpected, lambda k: f"{k} {_fmt_shape(sd[k].shape)}"))
        raise base.WeightsMismatchError(f"weights in {path} do not match {arch_desc}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)




@lru_cache(maxsize=8)
def clip_tokenizer(context_length: int) -> Callable[..., torch.Tensor]:
    """CLIP's BPE tokenizer with ``context_length`` tokens per text (one instance per length)."""
    return open_clip.SimpleTokenizer(context_length=context_length)


def _finish(model: nn.Module, device: str | torch.device) -> nn.Module:
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_file(path: Path, *, device: str | torch.device, arch: str | None, quick_gelu: bool | None,
               name: str, source: str, defaults: dict[str, str] | None = None) -> LoadedClip:
    if not path.is_file():
        raise base.WeightsNotFoundError(f"no such file: {path}" if not path.exists() else f"not a file: {path}")
    sha = base.file_sha256(path)
    base._check_known_hash(path, sha)
    meta: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        sd, meta = _read_safetensors(path)
    else:
        sd = _read_torch_file(path)
    preprocess: dict[str, Any] = {}
    hub_layout = False  # the config is a Hugging Face repository's open_clip_config.json
    if arch is not None:
        cfg, arch_desc = _arch_config(arch), arch
    else:
        found = _find_config(path, meta)
        if found is not None:
            cfg, preprocess, where = found
            hub_layout = Path(where).name == HUB_CONFIG_NAME
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
        # open_clip's configs leave the key out for GELU models (LAION): the Hub's layout (the file the hf-hub
        # loader reads, downloaded by hand) follows that rule as an hf-hub: id does; other files default to OpenAI's
        quick_gelu = bool(cfg.get("quick_gelu", not hub_layout))
    model = _build(cfg, quick_gelu, str(path))
    if isinstance(model, CustomTextCLIP):  # text tower under `text.`
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    else:
        sd = _strip_text_prefix(sd)
    _load_strict(model, sd, path, arch_desc)
    context = int(getattr(model, "context_length", 77))
    vocab = getattr(model, "vocab_size", None)
    tokenizer = clip_tokenizer(context)
    if vocab is not None and vocab < tokenizer.vocab_size:
        _logger.warning("%s has a %d-token vocabulary but the CLIP tokenizer has %d tokens", path, vocab,
                        tokenizer.vocab_size)
    mean = tuple(float(x) for x in preprocess.get("mean", base.OPENAI_MEAN))
    std = tuple(float(x) for x in preprocess.get("std", base.OPENAI_STD))
    _logger.info("loaded CLIP %s from %s (sha256 %s)", name, path, sha[:12])
    own = {key: preprocess.get(f"excelseg_{key}") or (defaults or {}).get(key)
           for key in ("config", "knowledge", "vocabulary", "examples")}
    return LoadedClip(_finish(model, device), tokenizer, name, f"sha256:{sha}", source, mean, std,
                      default_config=own["config"], default_knowledge=own["knowledge"],
                      default_vocabulary=own["vocabulary"], examples=own["examples"])
