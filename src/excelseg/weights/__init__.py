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
style) unless ``quick_gelu`` or the config says otherwise (a Hub ``open_clip_config.json`` without the key: GELU). Loading is strict: missing or unexpected keys and
shape mismatches raise :class:`WeightsMismatchError`.

Only ViT image towers are supported (:func:`check_supported`): an open_clip ``VisionTransformer`` with standard
``ResidualAttentionBlock`` blocks, class-token pooling and no attentional pooler — any width, depth, patch size
or image size.
"""

from .._native import ENV_CACHE, default_cache_dir
from .base import (
                   DEFAULT_SPEC,
                   ENV_CLIP,
                   KNOWN_FILES,
                   NAMED_CONFIGS,
                   NAMED_DEFAULTS,
                   NAMED_WEIGHTS,
                   OPENAI_MEAN,
                   OPENAI_STD,
                   LoadedClip,
                   UnsupportedModelError,
                   WeightsFormatError,
                   WeightsMismatchError,
                   WeightsNotFoundError,
                   check_supported,
                   file_sha256,
)
from .resolve import load_clip

__all__ = [
    "DEFAULT_SPEC",
    "ENV_CACHE",
    "ENV_CLIP",
    "KNOWN_FILES",
    "NAMED_CONFIGS",
    "NAMED_DEFAULTS",
    "NAMED_WEIGHTS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "LoadedClip",
    "UnsupportedModelError",
    "WeightsFormatError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "check_supported",
    "default_cache_dir",
    "file_sha256",
    "load_clip",
]
