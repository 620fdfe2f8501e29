"""`excelseg pseudo-label`: prepare → pseudo-label → eval on a miniature VOC tree, resume, kill + resume, shards,
workers, failures, CRF, splits without labels; the reduced-size CAM archives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.cli import main
from excelseg.config import apply_overrides, load_config
from excelseg.data import open_dataset
from excelseg.io.cams import cam_size_for, read_cam_archive
from excelseg.io.files import read_label_png, save_label_png
from excelseg.jobs.outputs import stale_temps_of
from excelseg.jobs.runner import Shard
from tiny_clip import save_tiny

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_sample"
SHRINK = 4  # sample images at 1/4 size: PAR at full resolution dominates the cost on a CPU
NO_LABEL_ID = "2099_000001"  # listed in test.txt only, no mask → no image-level label
GRID = 4  # tiny CLIP: --size 64, patch 16


def make_voc(base: Path, copies: int = 1) -> Path:
    """VOCdevkit/VOC2012 under ``base`` from the sample images (shrunk ``SHRINK``×; masks NEAREST): train.txt and
    val.txt list every image (``copies`` ids per sample image), test.txt one extra image without a mask."""
    if not (SAMPLE / "manifest.json").is_file():
        pytest.skip(f"VOC sample data not found at {SAMPLE} (shared/data/voc_sample/manifest.json)")
    entries = json.loads((SAMPLE / "manifest.json").read_text())["orig"]
    root = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    ids = []
    for k, (name, e) in enumerate(sorted(entries.items())):
        with Image.open(SAMPLE / e["image"]) as im:
            im = im.convert("RGB")
            size = (im.width // SHRINK, im.height // SHRINK)
            small = im.resize(size, Image.BILINEAR)
        mask = Image.fromarray(read_label_png(SAMPLE / e["mask"])).resize(size, Image.NEAREST)
        for c in range(copies):
            image_id = name if c == 0 else f"2098_{k:02d}{c:04d}"
            small.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            save_label_png(root / "SegmentationClass" / f"{image_id}.png", np.asarray(mask))
            ids.append(image_id)
    small.save(root / "JPEGImages" / f"{NO_LABEL_ID}.jpg", quality=95)
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(ids) + "\n")
    (lists / "val.txt").write_text("\n".join(ids) + "\n")
    (lists / "test.txt").write_text(NO_LABEL_ID + "\n")
    assert main(["prepare", "--dataset", "voc", "--root", str(root), "--workers", "1"]) == 0
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("pl")
    root = make_voc(base)
    clip = save_tiny(base / "tiny.pt", layers=6, patch=16, image=64, heads=1)
    ref = base / "ref"
    assert pseudo_label(root, clip, ref, "--workers", "0", "--save-cams") == 0
    return root, clip, ref


def pseudo_label(root: Path, clip: Path, out: Path, *extra) -> int:
    return main(["pseudo-label", "--dataset", "voc", "--root", str(root), "--split", "train", "--out-dir", str(out),
                 "--clip", str(clip), "--size", "64", "--device", "cpu", *map(str, extra)])


def train_ids(root: Path) -> list[str]:
    return open_dataset("voc", root, "train", with_mask=False).ids


def labels_of(folder: Path, ids) -> dict[str, np.ndarray]:
    return {i: read_label_png(folder / f"{i}.png") for i in ids}


def hidden_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


# ------------------------------------------------------------------------------------------------------------


def test_end_to_end_labels_cams_eval(setup, tmp_path, capsys):
    root, _, ref = setup
    ds = open_dataset("voc", root, "train", with_mask=False)
    assert len(ds.ids) == 5
    for name in ds.ids:
        label = read_label_png(ref / f"{name}.png")
        h, w = ds.load_image(name).shape[:2]
        assert label.shape == (h, w)
        gt = set(ds.class_ids(name))
        assert gt and set(np.unique(label).tolist()) <= {0} | gt
        with np.load(ref / f"{name}_cams.npz") as z:  # reduced size, float16, K = the image's classes
            assert z["cams"].dtype == np.float16 and z["cams"].shape == (len(gt), GRID, GRID)
            assert z["class_ids"].tolist() == sorted(gt) and z["size"].tolist() == [h, w]
            assert 0.0 <= float(z["cams"].min()) and float(z["cams"].max()) <= 1.0
        assert (ref / f"{name}_cams.npz").stat().st_size < 4096
        cams, ids = read_cam_archive(ref / f"{name}_cams.npz")
        assert cams.shape == (len(gt), h, w) and cams.dtype == np.float32 and ids.tolist() == sorted(gt)
    assert not hidden_files(ref) and not (ref / f"{NO_LABEL_ID}.png").exists()

    capsys.readouterr()
    assert main(["eval", "--pred", str(ref), "--root", str(root), "--split", "train", "--workers", "1"]) == 0
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["evaluated"] == 5 and 0.0 <= metrics["miou"] <= 1.0

    out = tmp_path / "cam_metrics.json"
    rc = main(["eval-cams", "--cams", str(ref), "--root", str(root), "--workers", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert 0.0 <= json.loads(out.read_text())["best_miou"] <= 1.0


def test_resume_writes_nothing(setup, capsys):
    root, clip, ref = setup
    before = {p.name: p.stat().st_mtime_ns for p in ref.iterdir()}
    capsys.readouterr()
    assert pseudo_label(root, clip, ref, "--workers", "0", "--save-cams") == 0
    out = capsys.readouterr().out
    assert "5 already done" in out and "done: 0 written, 5 skipped, 0 failed" in out
    assert {p.name: p.stat().st_mtime_ns for p in ref.iterdir()} == before


def test_workers_and_batches_give_the_same_labels(setup, tmp_path):
    root, clip, ref = setup
    ids = train_ids(root)
    assert pseudo_label(root, clip, tmp_path / "w2", "--workers", "2") == 0
    expected = labels_of(ref, ids)
    for name, label in labels_of(tmp_path / "w2", ids).items():
        np.testing.assert_array_equal(label, expected[name])
    assert not list((tmp_path / "w2").glob("*_cams.npz"))
    # batched forwards: same labels up to float rounding in the batched matmuls
    assert pseudo_label(root, clip, tmp_path / "b3", "--workers", "1", "--batch-size", "3") == 0
    for name, label in labels_of(tmp_path / "b3", ids).items():
        assert label.shape == expected[name].shape and np.mean(label != expected[name]) < 1e-3


def test_shards_are_disjoint_and_complete(setup, tmp_path, monkeypatch):
    root, clip, ref = setup
    ids = train_ids(root)
    assert pseudo_label(root, clip, tmp_path / "s0", "--shard", "0/2", "--save-cams", "--cam-size", "16") == 0
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pseudo_label(root, clip, tmp_path / "s1", "--workers", "0") == 0
    got = [{p.stem for p in (tmp_path / f"s{r}").glob("*.png")} for r in (0, 1)]
    assert not got[0] & got[1] and got[0] | got[1] == set(ids)
    assert got[0] == set(sorted(ids)[0::2]) and got[1] == set(sorted(ids)[1::2])
    expected = labels_of(ref, ids)
    for r in (0, 1):
        for name, label in labels_of(tmp_path / f"s{r}", got[r]).items():
            np.testing.assert_array_equal(label, expected[name])
    ds = open_dataset("voc", root, "train", with_mask=False)
    for name in got[0]:  # --cam-size 16: longer side 16, the image's aspect
        with np.load(tmp_path / "s0" / f"{name}_cams.npz") as z:
            h, w = ds.load_image(name).shape[:2]
            assert z["cams"].shape[1:] == cam_size_for(16, (GRID, GRID), (h, w)) and max(z["cams"].shape[1:]) == 16


def test_shard_selection():
    ids = [f"{i:03d}" for i in range(11)][::-1]
    parts = [Shard(r, 3).select(ids) for r in range(3)]
    assert sorted(i for p in parts for i in p) == sorted(ids) and all(len(p) in (3, 4) for p in parts)
    assert Shard.parse("2/3") == Shard(2, 3)
    assert Shard.from_env({"WORLD_SIZE": "4", "RANK": "3"}) == Shard(3, 4) and Shard.from_env({}) is None
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


# Runs the CLI in a child process that SIGKILLs itself inside the atomic write of its KILL_AT-th label PNG: the
# temporary file is complete, the rename has not happened. Deterministic (no timing), and as hard as a real crash.
_KILLING_DRIVER = """
import os, signal, sys
from pathlib import Path
out, kill_at = Path(sys.argv[1]).resolve(), int(sys.argv[2])
real_replace, written = os.replace, []
def replace(src, dst, *a, **kw):
    if Path(dst).suffix == ".png" and Path(dst).resolve().parent == out:
        written.append(dst)
        if len(written) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)
os.replace = replace
from excelseg.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_killed_run_resumes_cleanly(tmp_path):
    root = make_voc(tmp_path / "data", copies=2)
    clip = save_tiny(tmp_path / "tiny.pt", layers=6, patch=16, image=64, heads=1)
    out = tmp_path / "out"
    ids = train_ids(root)
    args = ["pseudo-label", "--root", str(root), "--split", "train", "--out-dir", str(out), "--clip", str(clip),
            "--size", "64", "--device", "cpu", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLING_DRIVER, str(out), "3", *args], env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len([p for p in out.glob("*.png") if not p.name.startswith(".")]) == 2  # the third was being renamed when the process died
    assert len(hidden_files(out)) == 1  # its complete temporary file
    assert main(args) == 0  # the same command, in-process
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in ids] + ["excelseg_config.yaml",
                                                                                         "excelseg_run.json"])
    resolved = load_config(out / "excelseg_config.yaml")  # the settings the run used, written next to its outputs
    assert resolved.cam.size == (64, 64) and resolved.refine == load_config("voc").refine
    assert not hidden_files(out)
    for name in ids:
        with Image.open(out / f"{name}.png") as im:
            im.load()
            assert im.mode == "P"


def test_missing_image_is_reported_and_skipped(tmp_path, capsys):
    root = make_voc(tmp_path / "data")
    clip = save_tiny(tmp_path / "tiny.pt", layers=6, patch=16, image=64, heads=1)
    ids = train_ids(root)
    (root / "JPEGImages" / f"{ids[1]}.jpg").unlink()
    capsys.readouterr()
    assert pseudo_label(root, clip, tmp_path / "out", "--workers", "2", "--batch-size", "2") == 1
    cap = capsys.readouterr()
    assert "done: 4 written, 0 skipped, 1 failed" in cap.out
    assert f"failed: {ids[1]}: cannot read image" in cap.err and "no such file" in cap.err
    assert {p.stem for p in (tmp_path / "out").glob("*.png")} == set(ids) - {ids[1]}
    assert pseudo_label(root, clip, tmp_path / "out", "--workers", "0") == 1  # still missing; the rest skipped
    assert "done: 0 written, 4 skipped, 1 failed" in capsys.readouterr().out


def test_split_without_labels_needs_all_classes(setup, tmp_path, capsys):
    root, clip, _ = setup
    out = tmp_path / "test"
    args = ["pseudo-label", "--root", str(root), "--split", "test", "--out-dir", str(out), "--clip", str(clip),
            "--size", "64", "--device", "cpu", "--workers", "0"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 1 images of voc test have no image-level labels" in err and "--all-classes" in err
    assert len(err.strip().splitlines()) == 1 and not (out / f"{NO_LABEL_ID}.png").exists()
    assert main([*args, "--all-classes", "--save-cams"]) == 0
    with np.load(out / f"{NO_LABEL_ID}_cams.npz") as z:
        assert z["cams"].shape == (20, GRID, GRID) and z["class_ids"].tolist() == list(range(1, 21))
    assert read_label_png(out / f"{NO_LABEL_ID}.png").max() <= 20


def test_usage_errors(setup, tmp_path, capsys):
    root, clip, _ = setup
    capsys.readouterr()
    assert pseudo_label(root, clip, tmp_path / "o", "--shard", "2/2") == 2
    assert "shard must be i/n" in capsys.readouterr().err
    assert pseudo_label(root, clip, tmp_path / "o", "--cam-size", "1024", "--save-cams") == 2
    assert "a reduced size keeps" in capsys.readouterr().err
    assert main(["pseudo-label", "--out-dir", str(tmp_path / "o")]) == 2
    assert "give --root" in capsys.readouterr().err


def test_stale_temp_cleanup_touches_only_given_ids(tmp_path):
    for name in (".a.png.x1.png", ".a_cams.npz.y2.npz", ".b.png.z3.png", ".a.png", "a.png", ".other"):
        (tmp_path / name).write_bytes(b"x")
    assert stale_temps_of(tmp_path, ["a"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.png", ".b.png.z3.png", ".other", "a.png"]


def test_crf_changes_labels(setup, tmp_path):
    pytest.importorskip("pydensecrf")
    root, clip, ref = setup
    ids = train_ids(root)
    assert pseudo_label(root, clip, tmp_path / "crf", "--crf", "--workers", "0") == 0
    ds = open_dataset("voc", root, "train", with_mask=False)
    plain, crf = labels_of(ref, ids), labels_of(tmp_path / "crf", ids)
    for name in ids:
        assert crf[name].shape == plain[name].shape
        assert set(np.unique(crf[name]).tolist()) <= {0} | set(ds.class_ids(name))
    assert any((crf[n] != plain[n]).any() for n in ids)


def test_crf_missing_extra_is_one_line(setup, tmp_path, capsys, monkeypatch):
    root, clip, _ = setup
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    capsys.readouterr()
    assert pseudo_label(root, clip, tmp_path / "o", "--crf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'excelseg[crf]'" in err


def test_checkpoint_gives_lvc_labels_and_is_checked(setup, tmp_path, capsys):
    """--checkpoint: LVC pseudo-labels (differ from the training-free ones); a checkpoint for another class list
    or another CLIP is refused with one line."""
    from excelseg.heads import ExcelHeads
    from excelseg.interop import source_sha256
    from excelseg.io.checkpoint import save_checkpoint
    from excelseg.vocab import Vocabulary

    root, clip, ref = setup
    torch.manual_seed(0)
    heads = ExcelHeads(21, 6, 64, dim=32, heads=2).state_dict()
    cfg = apply_overrides(load_config("voc"), ["cam.size=64", "heads.dim=32", "heads.decoder_heads=2"])
    ckpt = tmp_path / "voc.safetensors"
    save_checkpoint(ckpt, heads, class_names=Vocabulary.named("voc").names,
                    clip_identity=f"sha256:{source_sha256(clip)}", config=cfg)
    out = tmp_path / "lvc"
    assert pseudo_label(root, clip, out, "--workers", "0", "--checkpoint", ckpt) == 0
    ids = train_ids(root)
    ours, static = labels_of(out, ids), labels_of(ref, ids)
    assert any(not np.array_equal(ours[i], static[i]) for i in ids)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, ExcelHeads(3, 6, 64, dim=32, heads=2).state_dict(), class_names=["cat", "dog"],
                    clip_identity=f"sha256:{source_sha256(clip)}", config=cfg)
    assert pseudo_label(root, clip, tmp_path / "o2", "--checkpoint", other) == 2
    err = capsys.readouterr().err
    assert "trained for 2 classes" in err and len(err.strip().splitlines()) == 1
    wrong_clip = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong_clip, heads, class_names=Vocabulary.named("voc").names, clip_identity="ViT-B-16:openai",
                    config=cfg)
    assert pseudo_label(root, clip, tmp_path / "o3", "--checkpoint", wrong_clip) == 2
    assert "made with CLIP ViT-B-16:openai" in capsys.readouterr().err
