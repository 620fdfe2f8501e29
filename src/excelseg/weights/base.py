"""Types, constants and checks shared by the weight loaders: :class:`LoadedClip`, the errors, the shipped and
known files, file sha256 (cached per path, size and mtime), and which image towers excelseg supports."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

_logger = logging.getLogger(__name__)


DEFAULT_SPEC = "ViT-B-16"  # the paper's backbone: CLIP ViT-B/16, OpenAI weights
ENV_CLIP = "EXCELSEG_CLIP"
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
#: What each shipped model was made for (its weights carry it; nothing else in excelseg names a model):
#: ``config`` (an excelseg.config name), ``knowledge`` (a shipped knowledge base), ``vocabulary`` (a named
#: vocabulary), ``examples`` (what the app shows: "scenes" = generated scenes, else sample photos).
NAMED_DEFAULTS: dict[str, dict[str, str]] = {
    "synthetic": {"config": "synthetic", "knowledge": "synthetic", "vocabulary": "synthetic", "examples": "scenes"},
}
NAMED_CONFIGS: dict[str, str] = {k: v["config"] for k, v in NAMED_DEFAULTS.items()}

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
    # what else the weights were made for (NAMED_DEFAULTS, or ``excelseg_knowledge`` / ``excelseg_vocabulary`` /
    # ``excelseg_examples`` of the stored config): a knowledge base, a named vocabulary, the app's examples
    default_knowledge: str | None = None
    default_vocabulary: str | None = None
    examples: str | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the image tower was trained at."""
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --------------------------------------------------------------------------------------------------- sha256

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed; cached in-process by (path, size, mtime)."""
    path = Path(path)
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
