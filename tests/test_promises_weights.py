"""Documented promises of the weight loader (issue 24, item 8, CLI/config part: points 1 and 6).

* **QuickGELU vs GELU** (docs/cli-and-weights.md "CLIP weights": "QuickGELU vs GELU cannot be read from weights —
  local files default to QuickGELU (OpenAI); pass ``quick_gelu=False`` for LAION files"; ``load_clip``: "Files
  default to QuickGELU (OpenAI style) unless ``quick_gelu`` or the config says otherwise"; an ``hf-hub:`` id is
  built from its own open_clip config). For every local format (plain state dict, safetensors, OpenAI TorchScript,
  a config in the safetensors metadata or in a sibling JSON) and for a hub id, the activation of every MLP of both
  towers is checked by type, and the loaded model's image and text features equal those of an open_clip CLIP built
  here with that activation from the same weights — and differ from the other activation's, so the check sees it.
* **timm image towers are refused** (docs: "ResNet, timm and attention-pooling towers are refused with a clear
  'not supported' error"): a weight file whose open_clip config declares a timm tower, a state dict in open_clip's
  timm layout, an open_clip tag with a timm tower (refused before any download), an ``hf-hub:`` config with one, a
  built timm-tower model and the command line — each an :class:`UnsupportedModelError` naming the timm tower and
  what excelseg supports.
"""

from __future__ import annotations

import functools
import json
import pathlib

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from torch import nn

from excelseg.cli import main
from excelseg.weights import UnsupportedModelError, check_supported, load_clip
from test_weights import _fake_hf_cache, save_torchscript

SUPPORTED = "excelseg supports open_clip VisionTransformer image towers"
# Two 32-wide heads: the config must say so (shapes alone would infer one 64-wide head), so a file that carries a
# config is really built from it.
CFG = {"embed_dim": 32,
       "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def _model(quick_gelu: bool, head_width: int = 64, text_heads: int = 1) -> CLIP:
    """A random CLIP (seed 0, same weights whatever the activation: it has no parameters)."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=head_width, patch_size=8,
                                                        image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=text_heads, layers=1),
                 quick_gelu=quick_gelu)
    with torch.no_grad():  # non-trivial values everywhere: pre-activations spread well past |x| = 1
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model.requires_grad_(False).eval()


@functools.lru_cache(maxsize=1)
def _tokens() -> torch.Tensor:
    return open_clip.SimpleTokenizer(context_length=77)(["a photo of a cat.", "a dog"])


def _features(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(_tokens())


def _activations(model: nn.Module) -> set[type]:
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    return {type(b.mlp.gelu) for b in blocks}


def _assert_activation(loaded: nn.Module, quick: bool, reference: dict[bool, CLIP]) -> None:
    assert _activations(loaded) == {QuickGELU if quick else nn.GELU}
    got = _features(loaded)
    same, other = _features(reference[quick]), _features(reference[not quick])
    for g, s, o in zip(got, same, other):
        assert torch.equal(g, s)  # same weights, same maths: bitwise equal on one machine
        assert (g - o).abs().max() > 1e-3 * o.abs().max()  # the other activation is told apart


@pytest.fixture(scope="module")
def openai_style():
    """{quick_gelu: model} for the OpenAI head convention (inferable from shapes)."""
    return {q: _model(q) for q in (True, False)}


@pytest.fixture(scope="module")
def configured():
    """{quick_gelu: model} with 32-wide heads (needs a config)."""
    return {q: _model(q, head_width=32, text_heads=2) for q in (True, False)}


def _save(fmt: str, model: nn.Module, folder: pathlib.Path) -> pathlib.Path:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "pt":
        torch.save(sd, folder / "w.pt")
        return folder / "w.pt"
    if fmt == "safetensors":
        save_file(sd, str(folder / "w.safetensors"))
        return folder / "w.safetensors"
    save_torchscript(sd, folder / "w_openai.pt")
    return folder / "w_openai.pt"


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_local_files_default_to_quickgelu_and_quick_gelu_false_gives_gelu(fmt, openai_style, tmp_path):
    path = _save(fmt, openai_style[True], tmp_path)
    _assert_activation(load_clip(path).model, True, openai_style)
    _assert_activation(load_clip(path, quick_gelu=False).model, False, openai_style)
    _assert_activation(load_clip(path, quick_gelu=True).model, True, openai_style)


@pytest.mark.parametrize("where", ["metadata", "sibling"])
@pytest.mark.parametrize("quick", [False, True])
def test_a_config_that_sets_quick_gelu_decides(where, quick, configured, tmp_path):
    cfg = dict(CFG, quick_gelu=quick)
    sd = {k: v.clone() for k, v in configured[quick].state_dict().items()}
    if where == "metadata":
        path = tmp_path / "laion.safetensors"
        save_file(sd, str(path), metadata={"open_clip_config": json.dumps({"model_cfg": cfg})})
    else:
        path = tmp_path / "laion.pt"
        torch.save(sd, path)
        (tmp_path / "laion.pt.json").write_text(json.dumps(cfg))
    loaded = load_clip(path)
    assert loaded.model.visual.transformer.resblocks[0].attn.num_heads == 2  # built from the config
    _assert_activation(loaded.model, quick, configured)
    _assert_activation(load_clip(path, quick_gelu=not quick).model, not quick, configured)  # the argument wins


@pytest.mark.parametrize("quick", [None, False, True])
def test_hub_id_follows_its_config(quick, configured, tmp_path, monkeypatch):
    """An ``hf-hub:`` id is built as open_clip builds it: GELU unless its config sets ``quick_gelu: true`` (the
    LAION repositories' configs do not set it)."""
    import huggingface_hub.constants

    cfg = dict(CFG) if quick is None else dict(CFG, quick_gelu=quick)
    expected = bool(quick)
    weights = {k: v.clone() for k, v in configured[expected].state_dict().items()}
    _fake_hf_cache(tmp_path / "hub", "org/clip", {"open_clip_config.json": json.dumps({"model_cfg": cfg}).encode(),
                                                  "open_clip_model.safetensors": weights})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _assert_activation(load_clip("hf-hub:org/clip").model, expected, configured)
    _assert_activation(load_clip("hf-hub:org/clip", quick_gelu=not expected).model, not expected, configured)


@pytest.mark.parametrize("quick", [None, False, True])
def test_a_hub_repository_downloaded_by_hand_loads_as_its_hub_id(quick, configured, tmp_path):
    """The files the hf-hub "not found" message names (``open_clip_model.safetensors`` + ``open_clip_config.json`` in
    one folder) build what the ``hf-hub:`` id builds: GELU unless the config sets ``quick_gelu: true``; any other
    config without the key (``<file>.json``) still means QuickGELU (OpenAI)."""
    cfg = dict(CFG) if quick is None else dict(CFG, quick_gelu=quick)
    expected = bool(quick)
    save_file({k: v.clone() for k, v in configured[expected].state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    _assert_activation(load_clip(tmp_path / "open_clip_model.safetensors").model, expected, configured)
    if quick is None:  # the same config as <file>.json: the local-file default
        other = tmp_path / "other"
        other.mkdir()
        torch.save({k: v.clone() for k, v in configured[True].state_dict().items()}, other / "w.pt")
        (other / "w.pt.json").write_text(json.dumps(cfg))
        _assert_activation(load_clip(other / "w.pt").model, True, configured)


# ---- timm image towers ------------------------------------------------------------------------------------------

TIMM_VISION = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "token",
               "timm_proj": "linear", "image_size": 32}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}


@pytest.fixture(scope="module")
def timm_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**TIMM_VISION), text_cfg=CLIPTextCfg(**TEXT)).eval()


def _refused(call, *parts: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        call()
    msg = str(err.value)
    assert "timm" in msg and SUPPORTED in msg, msg
    for part in parts:
        assert part in msg, msg


def test_a_file_whose_config_declares_a_timm_tower_is_refused(timm_clip, tmp_path):
    path = tmp_path / "timm_tower.safetensors"
    cfg = {"embed_dim": 32, "vision_cfg": TIMM_VISION, "text_cfg": TEXT}
    save_file({k: v.clone() for k, v in timm_clip.state_dict().items()}, str(path),
              metadata={"open_clip_config": json.dumps({"model_cfg": cfg})})
    _refused(lambda: load_clip(path), str(path), "a timm image tower (vit_tiny_patch16_224)")


def test_a_timm_layout_state_dict_is_refused(timm_clip, tmp_path):
    path = tmp_path / "timm_tower.pt"
    sd = timm_clip.state_dict()
    assert any(k.startswith("visual.trunk.") for k in sd)  # open_clip's TimmModel layout
    torch.save(sd, path)
    _refused(lambda: load_clip(path), str(path), "holds a timm image tower")


def test_a_timm_tag_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("a model was built or downloaded"))
    _refused(lambda: load_clip("convnext_base:laion400m_s13b_b51k", cache_dir=tmp_path, download=True),
             "convnext_base has a timm image tower (convnext_base)")


def test_a_hub_config_with_a_timm_tower_is_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cfg = {"embed_dim": 32, "vision_cfg": TIMM_VISION, "text_cfg": TEXT}
    _fake_hf_cache(tmp_path / "hub", "org/timm-clip", {"open_clip_config.json": json.dumps({"model_cfg": cfg}).encode(),
                                                       "open_clip_model.safetensors": {"x": torch.zeros(1)}})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    _refused(lambda: load_clip("hf-hub:org/timm-clip"), "hf-hub:org/timm-clip has a timm image tower")


def test_a_built_timm_tower_is_refused(timm_clip):
    _refused(lambda: check_supported(timm_clip), "TimmModel (timm tower VisionTransformer)")
    _refused(lambda: check_supported(timm_clip.visual), "TimmModel")


def test_the_cli_refuses_a_timm_tower_in_one_line(timm_clip, tmp_path, capsys):
    path = tmp_path / "timm_tower.pt"
    torch.save(timm_clip.state_dict(), path)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert main(["cam", str(image), "--classes", "cat", "--clip", str(path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "timm image tower" in err and SUPPORTED in err
    assert not (tmp_path / "o").exists()
