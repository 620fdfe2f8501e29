"""Where weights are looked for and what is said when they are not found: the resolution order (argument →
``EXCELSEG_CLIP`` → default), the caches, offline switches, open_clip tags and the Hugging Face hub."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .._messages import one_line
from .._native import default_cache_dir
from . import base
from .base import ENV_CLIP, ENV_HF_OFFLINE, ENV_OFFLINE, LoadedClip, WeightsNotFoundError
from .build import _arch_config, _finish, _load_file, _unknown_arch
from .formats import HUB_CONFIG_NAME

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- environment


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
        return False, f"no network: {HUB_HOST} cannot be resolved"
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
    base.check_supported(model)
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    try:
        tokenizer = open_clip.get_tokenizer(arch, cache_dir=str(cache / "open_clip"))
    except Exception as e:
        raise WeightsNotFoundError(f"the tokenizer for {arch} could not be created: {e}") from e
    mean = tuple(float(x) for x in pcfg.get("mean", base.OPENAI_MEAN))
    std = tuple(float(x) for x in pcfg.get("std", base.OPENAI_STD))
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
    base._check_config_supported(_arch_config(arch), arch)
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
        for folder in (cache / "clip", Path(base.OPENAI_CLIP_DIR).expanduser()):
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
            raise base.WeightsMismatchError(f"open_clip could not load its cached {arch}:{tag} from {cached}: {e}") from e
        return _tag_result(model, arch, tag, device, f"{cached} (open_clip cache, {arch}:{tag})", cache)
    if cached is not None:  # a URL download: may be an OpenAI TorchScript archive, read it ourselves
        loaded = _load_file(cached, device=device, arch=arch, quick_gelu=quick_gelu, name=arch,
                            source=f"{cached} (open_clip cache, {arch}:{tag})")
        return replace(loaded, identity=f"{arch}:{tag}",
                       mean=tuple(float(x) for x in pcfg.get("mean", base.OPENAI_MEAN)),
                       std=tuple(float(x) for x in pcfg.get("std", base.OPENAI_STD)))
    looked.extend(places)

    allowed, why = _downloads(download)
    if not allowed:
        looked.append(f"open_clip download of {arch}:{tag} (disabled: {why})")
        raise WeightsNotFoundError(_not_found_message(arch, tag, looked, cache, openai_name))
    try:
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=str(oc_cache), **kwargs)
    except Exception as e:
        looked.append(f"open_clip download of {arch}:{tag} into {oc_cache} (failed: {one_line(e)})")
        raise WeightsNotFoundError(_not_found_message(arch, tag, looked, cache, openai_name)) from e
    return _tag_result(model, arch, tag, device, f"open_clip {arch}:{tag} ({oc_cache})", cache)


def _not_found_message(arch: str, tag: str, looked: list[str], cache: Path, openai_name: str | None) -> str:
    how = (f"Allow the download (go online and unset {ENV_OFFLINE}/{ENV_HF_OFFLINE}; in Python also "
           f"load_clip(..., download=True)), or pass a local file with --clip PATH / {ENV_CLIP}=PATH.")
    if openai_name is not None:
        sha = base.KNOWN_FILES.get(openai_name)
        url = open_clip.get_pretrained_url(arch, "openai")
        how = (f"Download {openai_name} from OpenAI's CLIP release ({url or 'github.com/openai/CLIP'}"
               f"{f', sha256 {sha}' if sha else ''}) and put it in {cache / 'clip'}{os.sep}, or pass "
               f"--clip PATH / set {ENV_CLIP}=PATH, or let open_clip download it (go online and unset "
               f"{ENV_OFFLINE}/{ENV_HF_OFFLINE}; in Python also load_clip(..., download=True)).")
    return f"CLIP weights {arch}:{tag} not found. Looked at: {'; '.join(looked)}. {how} {OFFLINE_HINT}"


OFFLINE_HINT = ("Offline, the shipped small CLIP runs anywhere: --clip synthetic (it only knows excelseg's synthetic "
                "shapes).")


def _load_hub(spec: str, looked: list[str], *, device: str | torch.device, download: bool | None,
              quick_gelu: bool | None) -> LoadedClip:
    repo_id = spec[len("hf-hub:"):].strip()
    if not repo_id:
        raise ValueError("empty Hugging Face Hub id after 'hf-hub:'")
    kwargs: dict[str, Any] = {}
    if quick_gelu is not None:
        kwargs = {"force_quick_gelu": True} if quick_gelu else {"quick_gelu": False}

    config = _hf_cached(repo_id, (HUB_CONFIG_NAME,), None)
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
                f"(go online and unset {ENV_OFFLINE}/{ENV_HF_OFFLINE}; in Python also load_clip(..., "
                f"download=True)), or download the repository's open_clip_model.safetensors and "
                f"{HUB_CONFIG_NAME} into one folder and pass the .safetensors file with --clip PATH / {ENV_CLIP}=PATH. "
                f"{OFFLINE_HINT}"
            )
        model_name, source = f"hf-hub:{repo_id}", f"Hugging Face Hub {repo_id}"
    try:
        hub_cfg = open_clip.get_model_config(model_name)
    except Exception as e:
        looked.append(f"open_clip config of {model_name} (failed: {one_line(e)})")
        raise WeightsNotFoundError(f"CLIP weights hf-hub:{repo_id} not found. Looked at: {'; '.join(looked)}.") from e
    if hub_cfg:
        base._check_config_supported(hub_cfg, f"hf-hub:{repo_id}")
    try:
        model = open_clip.create_model(model_name, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:
        looked.append(f"open_clip load of {model_name} (failed: {one_line(e)})")
        raise WeightsNotFoundError(f"CLIP weights hf-hub:{repo_id} not found. Looked at: {'; '.join(looked)}.") from e
    base.check_supported(model)
    pp = open_clip.get_model_preprocess_cfg(model)
    mean = tuple(float(x) for x in pp.get("mean", base.OPENAI_MEAN))
    std = tuple(float(x) for x in pp.get("std", base.OPENAI_STD))
    _logger.info("loaded CLIP hf-hub:%s from %s", repo_id, source)
    return LoadedClip(_finish(model, device), tokenizer, repo_id, f"hf-hub:{repo_id}", source, mean, std)


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec or "\\" in spec or os.sep in spec or spec.startswith("~")
        or spec.lower().endswith(base.WEIGHT_SUFFIXES)
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
        quick_gelu: QuickGELU activations; ``None``: True for local files unless their config says otherwise
            (a Hugging Face ``open_clip_config.json`` beside the file without the key: False, as for its
            ``hf-hub:`` id), the pretrained tag's setting for open_clip tags.

    Raises:
        WeightsNotFoundError: nothing found (the message lists every place looked and how to get the weights).
        base.WeightsMismatchError: wrong sha256 for a known file, or weights that do not fit the architecture
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
        text, origin = base.DEFAULT_SPEC, f"the default ({ENV_CLIP} is not set)"
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
    if text.lower() in base.NAMED_WEIGHTS:
        shipped = Path(__file__).resolve().parents[1] / base.NAMED_WEIGHTS[text.lower()]
        if not shipped.is_file():
            raise WeightsNotFoundError(f"the shipped weights {text!r} are missing from the installation: {shipped}")
        return _load_file(shipped, device=device, arch=arch, quick_gelu=quick_gelu, name=text.lower(),
                          source=f"{shipped} (shipped weights {text.lower()!r}, from {origin})",
                          defaults=base.NAMED_DEFAULTS.get(text.lower()))
    tag_text = text
    if path.is_dir():
        raise WeightsNotFoundError(f"not a weight file: {path} is a folder (from {origin}); pass a "
                                   ".pt/.pth/.bin/.safetensors file")
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
