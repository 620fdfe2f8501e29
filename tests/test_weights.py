"""excelseg.weights: every weight format, the resolution order, offline errors and refusals.

Tiny random CLIPs on CPU only; the network is blocked for every test in this file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
import warnings
import zipfile

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from torch import nn

from excelseg import weights
from excelseg.weights import (
    KNOWN_FILES,
    LoadedClip,
    UnsupportedModelError,
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
    check_supported,
    default_cache_dir,
    load_clip,
    resolve,
)

PROMPTS = ["a photo of a cat.", "a dog on grass"]


# ------------------------------------------------------------------------------------------------ helpers


class NetworkAttempted(BaseException):
    """Raised by the patched sockets; a BaseException so that no `except Exception` can hide it."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Block sockets, clear excelseg's variables, go offline and point HOME at an empty folder."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkAttempted(f"network access attempted: {args[1:] or args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("EXCELSEG_CLIP", "EXCELSEG_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EXCELSEG_OFFLINE", "1")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield attempts
    assert not attempts, f"network was attempted: {attempts}"


def tiny_clip(*, width=64, patch=8, image=32, layers=2, head_width=None, text_width=64, text_heads=None,
              quick_gelu=True, seed=0) -> CLIP:
    """A random CLIP with the OpenAI head convention (64-wide heads, at least one) unless told otherwise."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=image,
                           head_width=head_width or min(64, width))
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, layers=1,
                       heads=text_heads or max(1, text_width // 64))
    model = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    with torch.no_grad():  # non-trivial values everywhere, so any mis-assignment shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # frozen like a loaded CLIP: nn.MultiheadAttention takes its fused path only without grad-requiring weights
    return model.requires_grad_(False).eval()


@functools.lru_cache(maxsize=1)
def prompt_tokens() -> torch.Tensor:
    return open_clip.SimpleTokenizer(context_length=77)(PROMPTS)


def encode(model: nn.Module, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(2, 3, image_size, image_size, generator=gen)
    tokens = prompt_tokens()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_outputs(loaded: LoadedClip, original: nn.Module, image_size: int = 32) -> None:
    got_img, got_txt = encode(loaded.model, image_size)
    ref_img, ref_txt = encode(original, image_size)
    assert torch.equal(got_img, ref_img)
    assert torch.equal(got_txt, ref_txt)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_torchscript(state_dict: dict[str, torch.Tensor], path: pathlib.Path, image_size: int = 32) -> None:
    """A genuine TorchScript archive whose state dict has the CLIP keys plus OpenAI's int entries."""

    class Root(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Root()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        module.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
    for name, value in (("input_resolution", image_size), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
        torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny CLIP saved in every supported format."""
    root = tmp_path_factory.mktemp("weights")
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    out = {
        "pt": root / "tiny.pt",
        "pth": root / "tiny_wrapped.pth",
        "bin": root / "tiny.bin",
        "safetensors": root / "tiny.safetensors",
        "torchscript": root / "tiny_openai.pt",
    }
    torch.save(sd, out["pt"])
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, out["pth"])
    torch.save({"model": sd}, out["bin"])
    save_file(sd, str(out["safetensors"]))
    save_torchscript(sd, out["torchscript"])
    return out


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["pt", "pth", "bin", "safetensors", "torchscript"])
def test_every_format_loads_identically(fmt, files, tiny):
    path = files[fmt]
    loaded = load_clip(path)
    assert isinstance(loaded.model, CLIP)
    assert_same_outputs(loaded, tiny)
    assert loaded.identity == f"sha256:{sha256(path)}"
    assert loaded.name == path.stem
    assert str(path) in loaded.source
    assert (loaded.mean, loaded.std) == (weights.OPENAI_MEAN, weights.OPENAI_STD)
    assert not loaded.model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.image_size == (32, 32)
    assert torch.equal(loaded.model.attn_mask, tiny.attn_mask)  # unsaved buffer, rebuilt by the loader
    tokens = loaded.tokenizer(PROMPTS)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long


def test_torchscript_fixture_is_a_real_torchscript_archive(files):
    names = zipfile.ZipFile(files["torchscript"]).namelist()
    assert any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)
    plain = zipfile.ZipFile(files["pt"]).namelist()
    assert not any("/code/" in n for n in plain)


def test_identity_follows_the_file_content_not_a_stale_hash(tmp_path):
    """The identity is the file's sha256 (hashing is cached per path, size and mtime): rewriting the same path with
    other weights must give the new hash, or a bank/checkpoint check would accept mismatching weights."""
    path = tmp_path / "w.pt"
    torch.save(tiny_clip(seed=1).state_dict(), path)
    first = load_clip(path).identity
    assert first == f"sha256:{sha256(path)}"
    torch.save(tiny_clip(seed=2).state_dict(), path)
    st = path.stat()  # a later write: make its mtime differ even on a filesystem with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = load_clip(path).identity
    assert second == f"sha256:{sha256(path)}" and second != first


def test_other_patch_size_and_width_inferred(tmp_path):
    model = tiny_clip(width=48, patch=4, image=16, text_width=48, seed=3)
    path = tmp_path / "odd.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip(path)
    assert loaded.model.visual.patch_size == (4, 4)
    assert loaded.model.visual.conv1.out_channels == 48
    assert loaded.image_size == (16, 16)
    assert_same_outputs(loaded, model, image_size=16)


def test_open_clip_custom_text_layout_is_accepted(tiny, tmp_path):
    path = tmp_path / "custom_text_layout.safetensors"
    sd = open_clip.model.convert_to_custom_text_state_dict(dict(tiny.state_dict()))
    assert "text.token_embedding.weight" in sd
    save_file({k: v.clone() for k, v in sd.items()}, str(path))
    assert_same_outputs(load_clip(path), tiny)


def _config_model():
    """Two 32-wide heads per tower and GELU: not inferable from shapes, so the file must carry a config."""
    cfg = {
        "embed_dim": 32,
        "quick_gelu": False,
        "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    model = tiny_clip(head_width=32, text_heads=2, quick_gelu=False, seed=5)
    return cfg, model


def test_safetensors_metadata_config_is_used(tmp_path):
    cfg, model = _config_model()
    path = tmp_path / "small.safetensors"
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    save_file(model.state_dict(), str(path),
              metadata={"open_clip_config": json.dumps({"model_cfg": cfg, "preprocess_cfg": pre})})
    loaded = load_clip(path)
    assert loaded.model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert_same_outputs(loaded, model)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)

    bare = tmp_path / "bare.safetensors"  # same weights, no config: inferred heads/activation differ
    save_file(model.state_dict(), str(bare))
    assert not torch.equal(encode(load_clip(bare).model)[0], encode(model)[0])


def test_sibling_json_config_is_used(tmp_path):
    cfg, model = _config_model()
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    (tmp_path / "small.pt.json").write_text(json.dumps(cfg))
    assert_same_outputs(load_clip(path), model)


# ------------------------------------------------------------------------------------- resolution order


def test_explicit_argument_beats_env(files, tmp_path, monkeypatch):
    other = tmp_path / "other.pt"
    torch.save(tiny_clip(seed=9).state_dict(), other)
    monkeypatch.setenv("EXCELSEG_CLIP", str(other))
    assert load_clip(files["pt"]).identity == f"sha256:{sha256(files['pt'])}"


def test_env_used_when_spec_is_none(files, monkeypatch):
    monkeypatch.setenv("EXCELSEG_CLIP", str(files["safetensors"]))
    loaded = load_clip()
    assert loaded.identity == f"sha256:{sha256(files['safetensors'])}"
    assert "EXCELSEG_CLIP" in loaded.source


def _cache_with_standin(files, root: pathlib.Path) -> pathlib.Path:
    (root / "clip").mkdir(parents=True)
    target = root / "clip" / "ViT-B-16.pt"
    shutil.copy(files["torchscript"], target)
    return target


@pytest.mark.parametrize("how", ["argument", "EXCELSEG_CACHE", "default spec"])
def test_tag_finds_openai_file_in_cache(how, files, tiny, tmp_path, monkeypatch):
    target = _cache_with_standin(files, tmp_path / "cache")
    monkeypatch.setitem(KNOWN_FILES, "ViT-B-16.pt", sha256(target))
    if how == "argument":
        loaded = load_clip("ViT-B-16", cache_dir=tmp_path / "cache")
    elif how == "EXCELSEG_CACHE":
        monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
        loaded = load_clip("ViT-B-16:openai")
    else:
        loaded = load_clip(None, cache_dir=tmp_path / "cache")
    assert loaded.identity == f"sha256:{sha256(target)}"
    assert loaded.name == "ViT-B-16"
    assert str(target) in loaded.source
    assert_same_outputs(loaded, tiny)


def test_tag_finds_openai_file_in_openai_clip_cache(files, tiny, tmp_path, monkeypatch):
    target = _cache_with_standin(files, pathlib.Path(os.environ["HOME"]) / ".cache")
    monkeypatch.setitem(KNOWN_FILES, "ViT-B-16.pt", sha256(target))
    loaded = load_clip("ViT-B-16", cache_dir=tmp_path / "empty")
    assert loaded.identity == f"sha256:{sha256(target)}"


def test_cache_file_with_wrong_sha256_is_refused(files, tmp_path, monkeypatch):
    target = _cache_with_standin(files, tmp_path / "cache")
    monkeypatch.setitem(KNOWN_FILES, "ViT-B-16.pt", "0" * 64)
    with pytest.raises(WeightsMismatchError) as err:
        load_clip("ViT-B-16", cache_dir=tmp_path / "cache")
    assert "0" * 64 in str(err.value) and sha256(target) in str(err.value)


def test_known_file_name_is_checked_for_explicit_paths_too(files, tmp_path):
    fake = tmp_path / "ViT-B-16.pt"
    shutil.copy(files["pt"], fake)
    with pytest.raises(WeightsMismatchError, match=KNOWN_FILES["ViT-B-16.pt"]):
        load_clip(fake)


def test_known_files_match_open_clip_urls():
    assert KNOWN_FILES["ViT-B-16.pt"] == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    for name, sha in KNOWN_FILES.items():
        url = open_clip.get_pretrained_url(name[: -len(".pt")].replace("-336px", "-336"), "openai")
        assert url.endswith(f"/{sha}/{name}"), (name, url)


def test_default_cache_dir(tmp_path, monkeypatch):
    assert default_cache_dir() == pathlib.Path(os.environ["HOME"]) / ".cache" / "excelseg"
    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


# ----------------------------------------------------------------------------------- offline and missing


def test_offline_missing_names_every_place_looked(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip(cache_dir=cache)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(cache / "clip" / "ViT-B-16.pt") in msg
    assert str(pathlib.Path(os.environ["HOME"]) / ".cache" / "clip" / "ViT-B-16.pt") in msg
    assert "EXCELSEG_CLIP" in msg and "is not set" in msg
    assert "EXCELSEG_OFFLINE=1" in msg and "disabled" in msg
    assert "5806e77c" in msg and "OpenAI" in msg and "--clip PATH" in msg
    assert "\n" not in msg


def test_offline_missing_mentions_env_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCELSEG_CLIP", "ViT-B-32")
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip(cache_dir=tmp_path)
    msg = str(err.value)
    assert "'ViT-B-32' from EXCELSEG_CLIP" in msg and "ViT-B-32.pt" in msg and KNOWN_FILES["ViT-B-32.pt"] in msg


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "download=False"])
def test_other_offline_switches(switch, tmp_path, monkeypatch):
    monkeypatch.delenv("EXCELSEG_OFFLINE")
    kwargs = {}
    if switch == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        kwargs["download"] = False
    with pytest.raises(WeightsNotFoundError, match=switch):
        load_clip("ViT-B-16", cache_dir=tmp_path, **kwargs)


def test_non_openai_tag_offline(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("ViT-B-32:laion2b_s34b_b79k", cache_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "open_clip") in msg and "disabled" in msg and "EXCELSEG_CLIP" in msg


def test_hf_hub_offline(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("hf-hub:nobody/no-such-clip", cache_dir=tmp_path)
    assert "hf-hub:nobody/no-such-clip" in str(err.value) and "disabled" in str(err.value)


def test_download_goes_through_open_clip_and_failure_is_reported(tmp_path, monkeypatch):
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("simulated download failure")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip("ViT-B-16", cache_dir=tmp_path, download=True)  # download=True overrides EXCELSEG_OFFLINE
    assert calls == [("ViT-B-16", {"pretrained": "openai", "cache_dir": str(tmp_path / "open_clip"),
                                   "force_quick_gelu": True})]
    assert "simulated download failure" in str(err.value) and str(tmp_path / "clip" / "ViT-B-16.pt") in str(
        err.value)


def _fake_hf_cache(root: pathlib.Path, repo_id: str, files: dict[str, bytes | dict]) -> pathlib.Path:
    """huggingface_hub's cache layout (refs/main -> snapshots/<rev>/<file>) holding ``files``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name, content in files.items():
        if isinstance(content, dict):
            save_file(content, str(snapshot / name))
        else:
            (snapshot / name).write_bytes(content)
    return snapshot


def test_download_success_is_identified_by_tag(tmp_path, monkeypatch):
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    monkeypatch.delenv("EXCELSEG_OFFLINE")
    monkeypatch.setattr(resolve, "_hub_resolvable", lambda timeout=3.0: True)  # pretend to be online
    loaded = load_clip("ViT-L-14:laion2b_s32b_b82k", cache_dir=tmp_path)
    assert calls == [("ViT-L-14", {"pretrained": "laion2b_s32b_b82k", "cache_dir": str(tmp_path / "open_clip"),
                                   "quick_gelu": False})]
    assert loaded.identity == "ViT-L-14:laion2b_s32b_b82k" and loaded.name == "ViT-L-14"
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_tag_found_in_open_clip_cache_without_network(tmp_path, monkeypatch):
    """A copy open_clip downloaded earlier (huggingface_hub layout in <cache>/open_clip) is used offline."""
    snapshot = _fake_hf_cache(tmp_path / "open_clip", "timm/vit_base_patch16_clip_224.openai",
                              {"open_clip_model.safetensors": {"x": torch.zeros(1)}})
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    loaded = load_clip("ViT-B-16", cache_dir=tmp_path)
    assert calls == [("ViT-B-16", {"pretrained": str(snapshot / "open_clip_model.safetensors"),
                                   "pretrained_text": False, "force_quick_gelu": True})]
    assert loaded.identity == "ViT-B-16:openai" and "open_clip cache" in loaded.source


def test_hf_hub_id_found_in_huggingface_cache_without_network(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cfg = {"embed_dim": 32, "quick_gelu": True,
           "vision_cfg": {"layers": 2, "width": 64, "patch_size": 8, "image_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    _fake_hf_cache(tmp_path / "hub", "org/tiny-clip", {
        "open_clip_config.json": json.dumps(config).encode(),
        "open_clip_model.safetensors": {k: v.clone() for k, v in tiny.state_dict().items()},
    })
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_clip("hf-hub:org/tiny-clip")
    assert loaded.identity == "hf-hub:org/tiny-clip"
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6)
    assert_same_outputs(loaded, tiny)


def test_missing_paths(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_clip(tmp_path / "missing.pt")
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_clip("some/where/clip")
    with pytest.raises(WeightsNotFoundError, match="not a weight file"):
        load_clip(tmp_path)


def test_openai_spelling_is_a_tag(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16.pt"):
        load_clip("ViT-B/16", cache_dir=tmp_path)


def test_unknown_architecture_and_tag(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"unknown CLIP architecture 'ViT-Q-99'.*list_models"):
        load_clip("ViT-Q-99", cache_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError, match="openai"):
        load_clip("ViT-B-16:no_such_tag", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------- wrong or bad files


def test_wrong_architecture_names_key_and_shapes(files):
    with pytest.raises(WeightsMismatchError) as err:
        load_clip(files["pt"], arch="ViT-B-16")
    msg = str(err.value)
    assert "ViT-B-16" in msg and str(files["pt"]) in msg
    assert "visual.conv1.weight has shape (64,3,8,8), expected (768,3,16,16)" in msg


def test_missing_and_unexpected_keys(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("visual.ln_post.weight")
    sd["visual.extra"] = torch.zeros(3)
    path = tmp_path / "odd_keys.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"missing keys: visual\.ln_post\.weight.*unexpected keys: "
                                                   r"visual\.extra \(3\)"):
        load_clip(path)


@pytest.mark.parametrize("name, content", [
    ("zero.pt", b""),
    ("random.pt", bytes(range(256)) * 8),
    ("random.bin", b"\x80\x02garbage-not-a-pickle" * 10),
    ("zero.safetensors", b""),
    ("random.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 4),
], ids=lambda value: value if isinstance(value, str) else "")
def test_corrupt_files_give_clear_errors(name, content, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError) as err:
        load_clip(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_zip(files, tmp_path):
    path = tmp_path / "truncated.pt"
    data = files["pt"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match="truncated or corrupt"):
        load_clip(path)


class _Tripwire:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused_not_unpickled(tiny, tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "with_objects.pt"
    torch.save({"state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=1), "hook": _Tripwire(marker)},
               path)
    with pytest.raises(WeightsFormatError, match="not a plain tensor checkpoint.*will not be unpickled"):
        load_clip(path)
    assert not marker.exists()


def test_non_tensor_state_dict_is_refused(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": "two"}, path)
    with pytest.raises(WeightsFormatError):
        load_clip(path)


# ------------------------------------------------------------------------------------------ towers


def test_resnet_tower_is_unsupported(tmp_path):
    torch.manual_seed(0)
    rn = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64),
              text_cfg=CLIPTextCfg(width=64, heads=1, layers=1), quick_gelu=True)
    with pytest.raises(UnsupportedModelError, match=r"ModifiedResNet.*VisionTransformer"):
        check_supported(rn)
    path = tmp_path / "rn.pt"
    torch.save(rn.state_dict(), path)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        load_clip(path)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        load_clip("RN50", cache_dir=tmp_path, download=True)  # refused before any download


@pytest.mark.parametrize("vision_kwargs, reason", [
    ({"attentional_pool": True}, "attentional pooler"),
    ({"qk_norm": True}, "CustomResidualAttentionBlock"),
    ({"pool_type": "avg"}, "pool_type='avg'"),
    ({"final_ln_after_pool": True}, "final_ln_after_pool"),
])
def test_other_unsupported_vit_variants(vision_kwargs, reason):
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32,
                                                        **vision_kwargs),
                 text_cfg=CLIPTextCfg(width=64, heads=1, layers=1))
    with pytest.raises(UnsupportedModelError, match=reason):
        check_supported(model)


def test_supported_tower_passes_as_model_or_tower(tiny):
    check_supported(tiny)
    check_supported(tiny.visual)


def test_no_network_is_detected_before_any_download(tmp_path, monkeypatch):
    """Without the offline switches, an unresolvable hub host disables the download at once."""
    monkeypatch.delenv("EXCELSEG_OFFLINE")
    monkeypatch.setattr(resolve, "_hub_resolvable", lambda timeout=3.0: False)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(WeightsNotFoundError, match="no network"):
        load_clip("ViT-B-16", cache_dir=tmp_path)
