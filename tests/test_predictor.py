"""CamPredictor on tiny random CLIPs: shapes, image modes, caching of the backbone pass, protocol, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg import CamPredictor
from excelseg.bank import AttributeBank
from excelseg.config import CamConfig, PipelineConfig, RefineConfig
from excelseg.vocab import Vocabulary
from numerics import F32_REL, assert_rel_close, rel_err
from tiny_clip import tiny_clip

SMALL = PipelineConfig(cam=CamConfig(size=(64, 64), svc_last_blocks=2), refine=RefineConfig(affinity_layers=3))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0, layers=4)


def rgb_image(h=50, w=70, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 40, 40)
    img[:, w // 2:] = (30, 60, 210)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


def test_result_shapes_and_values(clip):
    p = CamPredictor(clip, config=SMALL, device="cpu")
    r = p.set_image(rgb_image()).predict(["cat", "dog"])
    assert r.class_names == ["cat", "dog"] and r.class_ids == [1, 2]
    assert r.cams.shape == (2, 50, 70) and r.cams.dtype == np.float32
    assert r.cams.min() >= 0 and r.cams.max() <= 1
    assert r.pseudo_label.shape == (50, 70) and r.pseudo_label.dtype == np.uint8
    assert set(np.unique(r.pseudo_label)) <= {0, 1, 2}
    assert r.raw_cams.shape == (2, 8, 8)
    assert r.cams_at((5, 7)).shape == (2, 5, 7)


def test_backbone_runs_once_per_view(clip):
    calls = []
    handle = clip.model.visual.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        p = CamPredictor(clip, config=SMALL, device="cpu")
        p.set_image(rgb_image())
        assert len(calls) == 1
        a = p.predict(["cat", "dog"])
        b = p.predict(["sofa"])
        c = p.predict("cat,dog")
        assert len(calls) == 1
        assert b.class_names == ["sofa"] and np.array_equal(a.pseudo_label, c.pseudo_label)
        msf = CamPredictor(clip, config=SMALL.with_(cam=CamConfig(size=(64, 64), svc_last_blocks=2,
                                                                   scales=(1.0, 0.5), flip=True)), device="cpu")
        calls.clear()
        r = msf.set_image(rgb_image()).predict(["cat", "dog"])
        assert len(calls) == 4  # scales 1.0 and 0.5, each plain and flipped
        assert r.cams.min() >= 0 and r.cams.max() <= 1
        assert not np.allclose(r.raw_cams, a.raw_cams)
    finally:
        handle.remove()


def _modes():
    base = Image.fromarray(rgb_image(40, 30))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    i16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50).convert("I;16")
    return {"L": base.convert("L"), "LA": base.convert("LA"), "RGB": base, "RGBA": rgba,
            "P": base.convert("P"), "CMYK": base.convert("CMYK"), "I;16": i16,
            "np-gray": np.asarray(base.convert("L")), "np-rgba": np.asarray(rgba),
            "np-float": np.asarray(base, dtype=np.float32) / 255.0}


@pytest.mark.parametrize("mode", list(_modes()))
def test_any_image_mode_gives_outputs_at_original_size(clip, mode):
    img = _modes()[mode]
    r = CamPredictor(clip, config=SMALL, device="cpu").set_image(img).predict(["cat"])
    assert r.pseudo_label.shape == (40, 30) and r.cams.shape == (1, 40, 30)


def test_exif_orientation_is_applied(clip):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    Image.fromarray(rgb_image(40, 60)).save(buf, "JPEG", exif=exif)
    img = Image.open(io.BytesIO(buf.getvalue()))
    r = CamPredictor(clip, config=SMALL, device="cpu").set_image(img).predict(["cat"])
    assert r.pseudo_label.shape == (60, 40)


def test_one_pixel_image(clip):
    r = CamPredictor(clip, config=SMALL, device="cpu").set_image(np.full((1, 1, 3), 90, np.uint8)).predict(["a"])
    assert r.pseudo_label.shape == (1, 1) and r.cams.shape == (1, 1, 1)


# Peak memory is measured in a fresh child process: ru_maxrss is a process-wide high-water mark, so in the test
# process it would read 0 growth whenever an earlier test had peaked higher. The child warms up on a small image
# first (so library initialisation is not counted), then records the high-water mark before and after the huge one.
_HUGE_IMAGE_CHILD = """
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from numerics import F32_REL, assert_rel_close, rel_err
from tiny_clip import tiny_clip
from excelseg import CamPredictor
from excelseg.config import CamConfig, PipelineConfig, RefineConfig
cfg = PipelineConfig(cam=CamConfig(size=(64, 64), svc_last_blocks=2), refine=RefineConfig(affinity_layers=3))
p = CamPredictor(tiny_clip(0, layers=4), config=cfg, device="cpu")
p.set_image(np.full((300, 200, 3), 90, np.uint8)).predict(["cat", "dog"])
img = np.empty((12000, 9000, 3), np.uint8)
img[:, :4500] = (200, 30, 30)
img[:, 4500:] = (20, 30, 220)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = p.set_image(img).predict(["cat", "dog"])
label = r.pseudo_label
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"grown_mb": grown, "shape": list(label.shape), "cams_at": list(r.cams_at((120, 90)).shape),
                  "values": sorted(np.unique(label[::97, ::97]).tolist())}))
"""


def test_huge_image_bounded_memory():
    """12000×9000 (108 MP, 324 MB of pixels): the network sees a resized copy, PAR runs at ≤ 1024 px, outputs are
    full size, and the peak grows by < 1.5 GB over the image itself (a full-size float32 K+1 score stack alone
    would be 1.3 GB, its PAR neighbourhood tensors far more)."""
    proc = subprocess.run([sys.executable, "-c", _HUGE_IMAGE_CHILD, str(Path(__file__).parent)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["shape"] == [12000, 9000] and got["cams_at"] == [2, 120, 90]
    assert set(got["values"]) <= {0, 1, 2}
    assert got["grown_mb"] < 1500, f"peak memory grew by {got['grown_mb']:.0f} MB"


def test_vocabulary_protocol(clip):
    p = CamPredictor(clip, vocabulary="voc", config=SMALL, device="cpu").set_image(rgb_image())
    r = p.predict(["cat", "sofa"])
    assert r.class_ids == [8, 18] and set(np.unique(r.pseudo_label)) <= {0, 8, 18}
    assert p.predict(None).class_ids == list(range(1, 21))  # no image labels: every class competes
    with pytest.raises(ValueError, match="did you mean 'sofa'"):
        p.predict(["sofaa"])
    mine = p.predict(["cat", "sofa"], vocabulary=["cat", "sofa"])
    assert mine.class_ids == [1, 2]
    assert not np.allclose(mine.raw_cams, r.raw_cams)  # the vocabulary changes the alignment


def test_bad_use(clip):
    p = CamPredictor(clip, config=SMALL, device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(["cat"])
    p.set_image(rgb_image())
    for bad, msg in [([], "empty"), (["cat", "cat"], "duplicate"), (["cat", ""], "empty"),
                     ([f"c{i}" for i in range(201)], "at most 200")]:
        with pytest.raises(ValueError, match=msg):
            p.predict(bad)
    with pytest.raises(ValueError, match="give the class names"):
        p.predict(None)
    too_small = CamPredictor(clip, config=SMALL.with_(cam=CamConfig(size=(64, 64), svc_last_blocks=2,
                                                                    scales=(1.0, 0.1))), device="cpu")
    with pytest.raises(ValueError, match="smaller than the CLIP patch"):
        too_small.set_image(rgb_image())
    with pytest.raises(ValueError, match="channels last|layout|expected"):
        p.set_image(np.zeros((3, 40, 40), np.uint8))
    with pytest.raises(ValueError, match="16-d attributes"):
        CamPredictor(clip, bank=AttributeBank(torch.randn(5, 16)), config=SMALL, device="cpu")
    other = AttributeBank(torch.randn(5, 32), meta={"clip_identity": "sha256:feed"}, source="b.safetensors")
    with pytest.raises(ValueError, match="was built with CLIP sha256:feed"):
        CamPredictor(clip, bank=other, config=SMALL, device="cpu")
    with pytest.raises(ValueError, match="not both"):
        CamPredictor(clip, bank=other, knowledge="voc", config=SMALL, device="cpu")


def test_knowledge_enriches_only_described_classes(clip, tmp_path, monkeypatch, caplog):
    """--knowledge: classes with descriptions are TSE-enriched, the others keep plain prompts (one warning)."""
    import json

    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
    kb = {"cat": [f"a small furry pet number {i} with whiskers" for i in range(6)],
          "dog": [f"a loyal animal number {i} with a wagging tail" for i in range(6)]}
    (tmp_path / "kb.json").write_text(json.dumps(kb))
    plain = CamPredictor(clip, config=SMALL, device="cpu")
    rich = CamPredictor(clip, knowledge=str(tmp_path / "kb.json"), clusters=4, config=SMALL, device="cpu")
    vocab = Vocabulary.from_names(["cat", "dog", "forklift"])
    with caplog.at_level("WARNING"):
        t_rich = rich.text_features(vocab)
    t_plain = plain.text_features(vocab)
    assert not torch.allclose(t_rich[:2], t_plain[:2])
    torch.testing.assert_close(t_rich[2:], t_plain[2:])  # forklift and background words unchanged
    assert "forklift" in caplog.text and "plain prompts" in caplog.text
    assert list((tmp_path / "cache" / "banks").glob("*.safetensors"))  # built once, cached


def _ablation(clip, refine: bool, par: bool):
    cfg = SMALL.with_(refine=RefineConfig(affinity_layers=3, refine=refine, use_par=par))
    return CamPredictor(clip, config=cfg, device="cpu").set_image(rgb_image()).predict(["cat", "dog"])


@pytest.fixture(scope="module")
def all_on(clip):
    return _ablation(clip, refine=True, par=True)


@pytest.mark.parametrize("refine,par", [(False, True), (True, False), (False, False)])
def test_ablation_switches(clip, all_on, refine, par):
    """Each switch changes the output it acts on, and nothing upstream of it. refine=False: the grid CAMs are the
    raw alignment CAMs (no affinity / box); use_par=False: the grid CAMs are the all-on ones but the label scores
    skip PAR. Measured: grid CAMs move by 0.48 (of [0, 1]), PAR scores by 0.6, 7–40 % of the labels change; the
    bounds below are ≥ 10× under those and ≥ 50× over float32 noise (F32_REL)."""
    r = _ablation(clip, refine, par)
    assert r.pseudo_label.shape == (50, 70) and r.cams.max() <= 1
    # the alignment CAMs come before both switches
    assert_rel_close(r.raw_cams, all_on.raw_cams, F32_REL, "raw CAMs")
    grid_moved = rel_err(r.grid_cams, all_on.grid_cams)
    if refine:
        assert grid_moved == 0.0  # PAR acts after the refinement
    else:
        assert grid_moved > 0.05, grid_moved
        raw = r.raw_cams - r.raw_cams.min(axis=(1, 2), keepdims=True)
        raw = raw / raw.max(axis=(1, 2), keepdims=True)  # per-class min–max of the raw CAMs
        assert_rel_close(r.grid_cams, raw, F32_REL, "refine off: grid CAMs = raw CAMs")
    assert rel_err(r.scores, all_on.scores) > 0.05
    assert (r.pseudo_label != all_on.pseudo_label).mean() > 0.01


def test_normalization_from_the_weights(clip):
    """cam.normalization="weights" reads LoadedClip.mean/std: with CLIP's constants it equals "clip"."""
    from dataclasses import replace

    from excelseg.config import CLIP_MEAN, CLIP_STD

    img = rgb_image()
    with_clip_consts = replace(clip, mean=tuple(m / 255 for m in CLIP_MEAN), std=tuple(s / 255 for s in CLIP_STD))

    def run(c, norm):
        cfg = SMALL.with_(cam=replace(SMALL.cam, normalization=norm))
        return CamPredictor(c, config=cfg, device="cpu").set_image(img).predict(["cat", "dog"]).raw_cams

    by_weights = run(with_clip_consts, "weights")
    np.testing.assert_allclose(by_weights, run(clip, "clip"), rtol=0, atol=1e-5)  # same constants ±1 ulp of 255
    assert not np.allclose(run(clip, "weights"), by_weights, atol=1e-3)  # tiny_clip's own 0.5/0.5 differ
