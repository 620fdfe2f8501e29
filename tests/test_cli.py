"""`excelseg cam` / `excelseg demo` end to end through main(argv), with a tiny random CLIP weight file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from excelseg.cli import main
from tiny_clip import save_tiny


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # 6 blocks (SVC on the last 5, affinity over 6, as the paper preset), patch 16, width 64 → 1 head
    return save_tiny(tmp_path_factory.mktemp("w") / "tiny.pt", layers=6, patch=16, image=64, heads=1)


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 80), (90, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"img{i}.jpg")
    return d


def cam(weights, *args):
    return main(["cam", *map(str, args), "--clip", str(weights), "--size", "64"])


def test_cam_writes_every_output(weights, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat,dog", "--out-dir", out, "--save-cams") == 0
    for stem, size in [("img0", (60, 80)), ("img1", (90, 50))]:
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.size == size[::-1]
        assert set(np.unique(np.array(label))) <= {0, 1, 2}
        assert label.getpalette()[3:6] == [128, 0, 0]  # VOC colour of label 1
        Image.open(out / f"{stem}_overlay.jpg").verify()
        with np.load(out / f"{stem}_cams.npz") as z:
            assert z["cams"].dtype == np.float16 and z["cams"].shape == (2, *size)
            assert list(z["class_names"]) == ["cat", "dog"] and list(z["class_ids"]) == [1, 2]
    assert "2 written, 0 skipped, 0 failed" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_rerun_skips_and_overwrite_redoes(weights, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    stamp = (out / "img0.png").stat().st_mtime_ns
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    assert "2 of 2 images already done" in capsys.readouterr().out
    assert (out / "img0.png").stat().st_mtime_ns == stamp
    (out / "img1_overlay.jpg").unlink()  # an unfinished image is redone
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out, "--overwrite") == 0
    assert (out / "img0.png").stat().st_mtime_ns != stamp


def test_bad_images_are_reported_and_skipped(weights, photos, tmp_path, capsys):
    good = (photos / "img0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out, "--batch-size", "3") == 1
    io = capsys.readouterr()
    assert "2 written, 0 skipped, 2 failed" in io.out
    assert "truncated.jpg" in io.err and "empty.jpg" in io.err
    assert (out / "img0.png").is_file() and (out / "img1.png").is_file()
    assert not (out / "truncated.png").exists()


def test_globs_and_duplicate_stems(weights, photos, tmp_path):
    other = tmp_path / "more"
    other.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(other / "img0.png")
    out = tmp_path / "out"
    assert cam(weights, f"{photos}/*.jpg", other / "img0.png", "--classes", "cat", "--out-dir", out) == 0
    # the two img0 keep their folders (relative to the inputs' common folder): out/photos/, out/more/
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {"photos/img0.png", "img1.png",
                                                                             "more/img0.png"}


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--classes", "cat"], "no such file"),
    (["{empty_dir}", "--classes", "cat"], "no images"),
    (["{photos}", "--classes", ","], "empty class name"),
    (["{photos}", "--classes", "cat,Cat"], "duplicate class name"),
    (["{photos}", "--classes", ",".join(f"c{i}" for i in range(201))], "at most 200"),
    (["{photos}", "--vocabulary", "voc", "--classes", "sofaa"], "did you mean 'sofa'"),
    (["{photos}"], "give --classes"),
    (["{photos}", "--classes", "cat", "--out-dir", "{file}/sub"], "not writable"),
])
def test_usage_errors_are_one_line(weights, photos, tmp_path, capsys, args, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "file").write_text("x")
    fill = {"missing": tmp_path / "nope.jpg", "empty_dir": tmp_path / "empty_dir", "photos": photos,
            "file": tmp_path / "file"}
    args = [a.format(**fill) for a in args]
    if "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "out")]
    assert cam(weights, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_wrong_weights_are_refused(photos, tmp_path, capsys):
    import open_clip
    import torch

    rn = open_clip.model.CLIP(32, open_clip.model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64),
                              open_clip.model.CLIPTextCfg(width=32, heads=2, layers=1))
    torch.save(rn.state_dict(), tmp_path / "resnet.pt")
    args = ["cam", str(photos), "--classes", "cat", "--out-dir", str(tmp_path / "o")]
    assert main([*args, "--clip", str(tmp_path / "resnet.pt")]) == 2
    assert "support" in capsys.readouterr().err.lower()
    save_tiny(tmp_path / "ViT-B-16.pt", layers=6, patch=16)  # right name, wrong content
    assert main([*args, "--clip", str(tmp_path / "ViT-B-16.pt")]) == 2
    assert "sha256" in capsys.readouterr().err


def test_demo_without_weights_falls_back_to_synthetic(tmp_path, monkeypatch, capsys):
    """No real CLIP offline: the weight error is shown, then the shipped synthetic CLIP runs the offline demo."""
    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["demo", "--out-dir", str(tmp_path / "demo_out"), "--scenes", "4"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-16.pt" in out and str(tmp_path / "cache") in out and "EXCELSEG_CLIP" in out
    assert "plain CLIP (SVC and TSE off)" in out and "ExCEL training-free (SVC + TSE)" in out
    assert "ExCEL trained segmenter" in out and "side by side" in out
    from PIL import Image

    sheet = Image.open(tmp_path / "demo_out" / "synthetic_demo.png")
    assert sheet.width >= 4 * 96 and sheet.height >= 4 * 96  # 4 columns × 4 scenes


def test_explicit_missing_weights_are_an_error(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path / "o"), "--clip", "ViT-B-32"]) == 2
    assert "ViT-B-32" in capsys.readouterr().err


def test_demo_runs_with_weights(weights, tmp_path, capsys):
    pytest.importorskip("skimage")
    assert main(["demo", "--out-dir", str(tmp_path / "demo_out"), "--clip", str(weights), "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "chelsea.png" in out and "overlays written to" in out
    assert (tmp_path / "demo_out" / "chelsea_overlay.jpg").is_file()



def test_cam_with_knowledge(weights, photos, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("EXCELSEG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "kb.json").write_text(json.dumps({"cat": [f"a furry pet with whiskers, view {i}" for i in range(8)]}))
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat,dog", "--out-dir", out, "--knowledge", tmp_path / "kb.json",
               "--clusters", "3") == 0
    assert (out / "img0.png").is_file()
    assert cam(weights, photos, "--classes", "cat", "--out-dir", tmp_path / "o2", "--knowledge", "voc",
               "--clusters", "0") == 2
    assert "--clusters must be a positive integer" in capsys.readouterr().err
