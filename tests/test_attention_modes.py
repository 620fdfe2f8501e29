"""Last-block attention modes (MaskCLIP, SCLIP, ClearCLIP, NACLIP, plain CLIP) beside ExCEL's SVC (issue 23).

* parity with the goldens of ``../shared/parity/attention_modes`` (the authors' own code on the kit's seed-0 random
  ViT-B/16): every mode, all 19 images, 224 and 448, with the README's tolerance (1e-5 with its exact input);
* a literal float64 oracle of each mode's formula on a tiny CLIP (no kit needed);
* every mode differs from the others and from plain CLIP; ``svc`` (the default) is unchanged;
* the clients: settings validation, the training switch (static and LVC CAMs), the refinement staying the same
  on top of every mode, the app, ``excelseg cam --attention`` and ``eval-cams --attention``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from numerics import F64_REL, assert_rel_close, max_abs_diff
from parity_kit import SHARED, image_names, image_path, random_clip_weights, require_kit
from tiny_clip import tiny_clip, tiny_model

MODES_GOLDEN = {"none": "openai", "maskclip": "maskclip", "sclip": "sclip", "clearclip": "clearclip",
                "naclip": "naclip"}
GOLDEN_FILE = SHARED / "parity" / "attention_modes" / "golden_seed0.npz"
TOL = 1e-5  # attention_modes README §7: fp32 with the exact §5 input
NAMES = image_names()
# the parity passes share one model per size and reuse one pass of blocks 0…10 per image: keep them on one worker
pytestmark = pytest.mark.xdist_group("parity_attention")


# ---- a literal float64 oracle (README §3–§4), tiny CLIP ---------------------------------------------------------


def oracle_patches(visual, x: torch.Tensor, mode: str, sigma: float = 5.0) -> torch.Tensor:
    """(B, N, E) un-normalised patch features of ``mode``, one head and one token pair at a time."""
    p = visual.patch_size[0]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    g0 = visual.grid_size
    pos = visual.positional_embedding
    if (gh, gw) != tuple(g0):
        grid = pos[1:].reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0[0], (gw + 0.1) / g0[1]), mode="bicubic",
                             align_corners=False, recompute_scale_factor=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = visual.ln_pre(torch.cat([visual.class_embedding.expand(h.shape[0], 1, -1), h], 1) + pos)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        h = block(h)
    last = blocks[-1]
    q, k, v = F.linear(last.ln_1(h), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
    t = h.shape[1]
    omega = torch.zeros(t, t, dtype=h.dtype)
    for i in range(1, t):
        for j in range(1, t):
            ri, ci, rj, cj = (i - 1) // gw, (i - 1) % gw, (j - 1) // gw, (j - 1) % gw
            omega[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma ** 2))
    nh = last.attn.num_heads
    dh = q.shape[-1] // nh
    s = dh ** -0.5
    outs = []
    for hd in range(nh):
        sl = slice(hd * dh, (hd + 1) * dh)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        sm = {"qk": torch.softmax(s * qh @ kh.transpose(1, 2), -1), "qq": torch.softmax(s * qh @ qh.transpose(1, 2), -1),
              "kk": torch.softmax(s * kh @ kh.transpose(1, 2), -1)}
        a = {"none": sm["qk"], "maskclip": torch.eye(t, dtype=h.dtype).expand(h.shape[0], t, t),
             "sclip": sm["qq"] + sm["kk"], "clearclip": sm["qq"],
             "naclip": torch.softmax(s * kh @ kh.transpose(1, 2) + omega, -1)}[mode]
        outs.append(a @ vh)
    o = last.attn.out_proj(torch.cat(outs, -1))
    if mode in ("none", "maskclip", "sclip"):
        z = h + o
        z = z + last.mlp(last.ln_2(z))
    else:
        z = o
    return (visual.ln_post(z) @ visual.proj)[:, 1:]


@pytest.fixture(scope="module")
def tiny64():
    return copy.deepcopy(tiny_model(0, layers=3)).double()


@pytest.mark.parametrize("mode", list(MODES_GOLDEN))
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])  # the base grid (no interpolation) and a resized one
def test_modes_equal_a_literal_float64_oracle(tiny64, mode, size):
    from excelseg.backbone import DenseEncoder

    enc = DenseEncoder(tiny64.visual)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for tokens in (False, True):
        out = enc(x, (), (), attention=mode, pos_interp="bicubic", return_tokens=tokens)
        with torch.no_grad():
            expected = oracle_patches(tiny64.visual, x, mode)
        assert_rel_close(out.features[:, 1:], expected, F64_REL, f"{mode} {size}")
    # the CLS token is the original stream's (as for SVC), the pooled embedding unchanged
    plain = enc(x, (), (), pos_interp="bicubic")
    assert_rel_close(out.features[:, :1], plain.features[:, :1], F64_REL, "CLS")
    # a mode's cache re-runs exactly its last block (what the LVC path and dense_features' shared pass use)
    cached = enc(x, (), (), attention=mode, pos_interp="bicubic", keep_cache=True, return_tokens=False)
    again, _ = enc.calibrate(cached.cache)
    assert_rel_close(again[:, 1:], expected, F64_REL, f"{mode} re-run")


def test_naclip_neighbourhood_is_a_gaussian_without_cut_off():
    from excelseg.calibration import neighbourhood_bias

    omega = neighbourhood_bias((3, 5), 5.0, dtype=torch.float64)
    assert omega.shape == (16, 16) and omega[0].abs().sum() == 0 and omega[:, 0].abs().sum() == 0
    assert torch.allclose(omega.diagonal()[1:], torch.ones(15, dtype=torch.float64))
    # patch (0, 0) to patch (2, 4): d² = 4 + 16
    assert omega[1, 15].item() == pytest.approx(math.exp(-20 / 50), rel=1e-15)


# ---- non-degeneracy, svc unchanged -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    from excelseg import load_clip

    return load_clip("synthetic", device="cpu")


@pytest.fixture(scope="module")
def scenes():
    from excelseg.synthetic import SceneGenerator

    gen = SceneGenerator(size=96, seed=4242)
    return [gen.scene(i) for i in range(2)]


def test_each_mode_differs_from_the_others_and_from_plain_clip(synthetic, scenes):
    from excelseg import dense_features
    from excelseg.config import ATTENTION_MODES

    images = [s.image for s in scenes]
    for normalization in (None, "imagenet"):  # each mode's own input, and one input for all
        feats = dense_features(synthetic, images, attention=ATTENTION_MODES, size=96, normalization=normalization)
        assert all(f.shape == (2, 144, 128) for f in feats.values())
        assert all(torch.allclose(f.norm(dim=-1), torch.ones(2, 144), atol=1e-5) for f in feats.values())
        for i, a in enumerate(ATTENTION_MODES):
            for b in ATTENTION_MODES[i + 1:]:
                assert max_abs_diff(feats[a], feats[b]) > 1e-2, (a, b, normalization)
        # one at a time = from the shared pass, bit for bit
        assert torch.equal(dense_features(synthetic, images, attention="naclip", size=96,
                                          normalization=normalization), feats["naclip"])


def test_svc_is_the_default_and_unchanged(synthetic, scenes):
    from excelseg import ExcelModel, dense_features, load_config
    from excelseg.preprocess import network_input

    cfg = load_config("synthetic")
    assert cfg.cam.attention == "svc" and load_config("voc").cam.attention == "svc"
    model = ExcelModel(synthetic.model.visual, config=cfg, clip=synthetic)
    x = network_input(scenes[0].image, (96, 96))[None]
    enc = model.encoder
    before = enc(x, model.svc_blocks, model.aff_blocks, pos_via_grid=model._via, return_tokens=False)  # no mode
    now = model.dense(x, affinity=True)
    for name in ("features", "svc_stream", "attn", "pooled"):
        assert torch.equal(getattr(before, name), getattr(now, name)), name
    expected = F.normalize(model.dense(x).features[:, 1:], dim=-1)
    assert torch.equal(dense_features(model, scenes[0].image, size=96), expected)


# ---- settings and the clients ------------------------------------------------------------------------------------


def test_settings_are_validated():
    from excelseg.config import PAPER_VOC, ConfigError, apply_overrides

    cfg = apply_overrides(PAPER_VOC, ["cam.attention=naclip", "cam.attention_input=pipeline"])
    assert (cfg.cam.attention, cfg.cam.attention_input) == ("naclip", "pipeline")
    with pytest.raises(ConfigError, match="svc, maskclip, sclip, clearclip, naclip, none"):
        apply_overrides(PAPER_VOC, ["cam.attention=gem"])
    with pytest.raises(ConfigError, match="own, pipeline"):
        apply_overrides(PAPER_VOC, ["cam.attention_input=mine"])
    from excelseg import ExcelModel

    with pytest.raises(ValueError, match="cam.attention"):
        ExcelModel(tiny_model(0).visual, config=PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, attention="bogus")))


def test_refinement_is_the_same_on_top_of_every_mode(synthetic, scenes):
    """With one input for all modes, the attention affinity (ordinary q·k maps, ExCEL's layer weights) is identical:
    only the CAMs change; box mask, refinement and PAR run as for svc."""
    from excelseg import CamPredictor, load_config

    base = load_config("synthetic")
    names = list(scenes[0].names)
    states, labels = {}, {}
    for mode in ("svc", "sclip", "naclip"):
        cfg = base.with_(cam=replace(base.cam, attention=mode, attention_input="pipeline"))
        p = CamPredictor(synthetic, config=cfg, device="cpu")
        states[mode] = p.encode_batch([scenes[0].image])[0]
        labels[mode] = p.predict_state(states[mode], names)
    for mode in ("sclip", "naclip"):
        assert torch.equal(states[mode].trans, states["svc"].trans)
        assert torch.equal(states[mode].net_input, states["svc"].net_input)
        assert max_abs_diff(labels[mode].raw_cams, labels["svc"].raw_cams) > 1e-2
        assert labels[mode].pseudo_label.shape == scenes[0].mask.shape


def test_training_pseudo_labels_with_a_mode():
    """The ablation switch of training: static and LVC CAMs of the mode (LVC's shift E enters every head's map of
    the mode's last block), the adapter's input unchanged."""
    from excelseg import ExcelModel
    from excelseg.config import PAPER_VOC

    clip = tiny_clip(0, layers=4, image=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cls = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    outs = {}
    for mode in ("svc", "clearclip", "maskclip"):
        cfg = PAPER_VOC.with_(cam=replace(PAPER_VOC.cam, size=(32, 32), svc_last_blocks=2, attention=mode),
                              refine=replace(PAPER_VOC.refine, affinity_layers=3),
                              heads=replace(PAPER_VOC.heads, dim=32, decoder_depth=1, decoder_heads=2))
        torch.manual_seed(0)
        model = ExcelModel(clip.model.visual, torch.eye(4, 32), 3, cfg, clip=clip).eval()
        out = model(x)
        static, lvc = model.static_cams(out), model.lvc_cams(out)
        assert static.shape == lvc.shape == (2, 3, 4, 4) and max_abs_diff(static, lvc) > 1e-4
        labels = model.labels_from_output(out, x, cls, (32, 32), lvc=True, guided=True)
        assert labels.shape == (2, 32, 32)
        outs[mode] = out, static
    assert torch.equal(outs["clearclip"][0].seg_logits, outs["svc"][0].seg_logits)  # same adapter input
    assert max_abs_diff(outs["clearclip"][1], outs["svc"][1]) > 1e-3
    mode_cache = outs["clearclip"][0].cache
    assert mode_cache.attention == "clearclip" and mode_cache.select([1]).start.shape[0] == 1


def test_app_switch(synthetic, scenes, tmp_path):
    from PIL import Image

    from excelseg.app import AppModel
    from excelseg.app.model import Switches

    path = tmp_path / "scene.png"
    Image.fromarray(scenes[0].image).save(path)
    model = AppModel(synthetic, device="cpu", work_dir=tmp_path / "work")
    assert model._config_for(Switches(attention="sclip"), 1024).cam.attention == "sclip"
    assert model._config_for(Switches(svc=False, attention="naclip"), 1024).cam.svc_last_blocks == 5
    names = ", ".join(scenes[0].names)
    a = model.run(path, names, switches=Switches(tse=False, par=False, attention="naclip"))
    b = model.run(path, names, switches=Switches(tse=False, par=False, attention="clearclip"))
    assert a.ok and b.ok and not b.image_cached  # another mode is another image pass
    assert not model.run(path, names, switches=Switches(tse=False, attention="gem")).ok


def test_cli_cam_with_a_mode_and_eval_cams_check(tmp_path, scenes, capsys):
    from PIL import Image

    from excelseg.cli import main

    Image.fromarray(scenes[0].image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    classes = ",".join(scenes[0].names)
    assert main(["cam", str(tmp_path / "scene.png"), "--classes", classes, "--attention", "naclip", "--clip",
                 "synthetic", "--out-dir", str(out), "--save-cams", "--device", "cpu"]) == 0
    assert {"scene.png", "scene_overlay.jpg", "scene_cams.npz"} <= {p.name for p in out.iterdir()}
    assert "attention: naclip" in (out / "excelseg_config.yaml").read_text()
    # the override word is the same setting; a wrong mode is refused before any model is loaded
    assert main(["cam", str(tmp_path / "scene.png"), "--classes", classes, "cam.attention=sclip", "--clip",
                 "synthetic", "--out-dir", str(tmp_path / "o2"), "--device", "cpu"]) == 0
    assert "attention: sclip" in (tmp_path / "o2" / "excelseg_config.yaml").read_text()
    assert main(["cam", str(tmp_path / "scene.png"), "--classes", classes, "--attention", "gem"]) == 2
    capsys.readouterr()
    assert main(["eval-cams", "--cams", str(out), "--attention", "sclip", "--root", str(tmp_path)]) == 2
    assert "made with --attention naclip" in capsys.readouterr().err


# ---- parity with the authors' code (../shared/parity/attention_modes) ---------------------------------------------


@pytest.fixture(scope="module")
def goldens():
    require_kit()
    if not GOLDEN_FILE.is_file():
        pytest.skip(f"attention-mode goldens not found at {GOLDEN_FILE}")
    with np.load(GOLDEN_FILE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def kit_models(goldens):
    """One ExcelModel per size on the kit's seed-0 random ViT-B/16 (fp32)."""
    from excelseg import load_clip
    from excelseg.features import _as_model

    clip = load_clip(random_clip_weights(), device="cpu")
    return {s: _as_model(clip, (s, s), "cpu") for s in (224, 448)}


def test_input_is_the_goldens_input(goldens):
    from excelseg.io.images import read_image, to_rgb_array
    from excelseg.preprocess import network_input

    meta = json.loads(str(goldens["meta"]))
    x = network_input(to_rgb_array(read_image(image_path("2007_000129"))), (224, 224), "clip-mmseg", exact=True)
    assert max_abs_diff(x, goldens["input/224/2007_000129"]) <= 1e-6
    for im in meta["images"]:
        rgb = to_rgb_array(read_image(image_path(im["name"])))
        for size, stats in im["input_stats"].items():
            x = network_input(rgb, (int(size), int(size)), "clip-mmseg", exact=True).double()
            assert float(x.sum()) == pytest.approx(stats["sum"], rel=1e-6, abs=1e-2), im["name"]
            assert float((x * x).sum()) == pytest.approx(stats["sumsq"], rel=1e-6), im["name"]
            assert x[:, 0, 0].tolist() == pytest.approx(stats["x[0,:,0,0]"], abs=1e-6), im["name"]


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_the_authors_code(goldens, kit_models, size, name):
    from excelseg import dense_features
    from excelseg.io.images import read_image

    text = torch.from_numpy(goldens["text/T"])
    modes = list(MODES_GOLDEN)
    shift = NAMES.index(name) % len(modes)  # each mode takes the full forward on some images, the shared
    modes = modes[shift:] + modes[:shift]  # last-block re-run on the others
    feats = dense_features(kit_models[size], read_image(image_path(name)), attention=modes, size=size)
    logits = {}
    for mode, f in feats.items():
        key = f"{MODES_GOLDEN[mode]}/{size}/{name}"
        logits[mode] = f[0] @ text.T
        err = max_abs_diff(logits[mode], goldens[f"{key}/logits"])
        assert err <= TOL, f"{mode} logits off by {err:.2e}"
        if f"{key}/feats" in goldens:
            err = max_abs_diff(f[0], goldens[f"{key}/feats"])
            assert err <= TOL, f"{mode} features off by {err:.2e}"
    for i, a in enumerate(modes):  # the goldens tell every pair apart by ≥ 0.015 (README §6)
        for b in modes[i + 1:]:
            assert max_abs_diff(logits[a], logits[b]) > 100 * TOL, (a, b)
