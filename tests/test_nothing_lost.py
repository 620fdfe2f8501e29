"""Nothing lost, nothing mixed (issue 21): every input its own result, outputs that know what made them (the run
manifest), refusals that write nothing, every option range-checked, servers that fail like the CLI, the offline
hints and the smaller rough edges. Each test fails on the code before the issue."""

from __future__ import annotations

import json
import signal
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from excelseg.app.process import free_port
from excelseg.cli import main
from tiny_clip import save_tiny

SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "src" / "excelseg" / "assets" / "synthetic_heads.safetensors"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("w") / "tiny.pt", layers=6, patch=16, image=64, heads=1)


def _photo(path: Path, seed: int, size=(40, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def cam(weights, *args) -> int:
    return main(["cam", *map(str, args), "--clip", str(weights), "--size", "64"])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (what a refusal must leave as it was)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- every input, its own result --------------------------------------------------------------------------------


def test_output_names_are_unique_per_input_and_deterministic(tmp_path):
    from excelseg.jobs.outputs import output_names

    a = [tmp_path / "x.jpg", tmp_path / "y.jpg", tmp_path / "y.png"]
    assert output_names(a) == ["x", "y.jpg", "y.png"]
    assert output_names(a[::-1]) == ["y.png", "y.jpg", "x"]  # the same name per input, whatever the order
    b = [tmp_path / "a" / "y.jpg", tmp_path / "b" / "y.jpg", tmp_path / "z.jpg"]
    assert output_names(b) == ["a/y", "b/y", "z"]
    c = [tmp_path / "a" / "y.jpg", tmp_path / "a" / "y.png", tmp_path / "b" / "y.jpg"]
    assert output_names(c) == ["a/y.jpg", "a/y.png", "b/y.jpg"]
    d = [tmp_path / "y.jpg", tmp_path / "y.png", tmp_path / "y.jpg.png"]  # a stem that looks like a name above
    assert len(set(output_names(d))) == 3


def test_inputs_sharing_a_stem_each_get_their_outputs(weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i, name in enumerate(["x.jpg", "y.jpg", "y.png"]):
        _photo(photos / name, i)
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    labels = sorted(p.name for p in out.glob("*.png"))
    assert labels == ["x.png", "y.jpg.png", "y.png.png"], labels
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    assert "3 of 3 images already done" in capsys.readouterr().out


# ---- outputs that know what made them ---------------------------------------------------------------------------


def test_a_rerun_with_other_settings_is_refused_and_overwrite_redoes(weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(3):
        _photo(photos / f"p{i}.jpg", i)
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "bus,car", "--out-dir", out) == 0
    manifest = json.loads((out / "excelseg_run.json").read_text())
    assert manifest["command"] == "cam" and manifest["classes"] == ["bus", "car"]
    assert manifest["clip"].startswith("sha256:") and manifest["settings"]["refine"]["box_threshold"] == 0.79
    assert manifest["vocabulary"]["background"] and manifest["excelseg_version"]
    (out / "p1.png").unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert cam(weights, photos, "--classes", "cat,dog", "--out-dir", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings" in err and '["bus", "car"] -> ["cat", "dog"]' in err, err
    assert "--overwrite" in err
    assert cam(weights, photos, "--classes", "bus,car", "--out-dir", out, "--box-threshold", "0.5") == 2
    assert "refine.box_threshold: 0.79 -> 0.5" in capsys.readouterr().err
    assert snapshot(out) == before  # nothing written: no label, no rewritten config or manifest
    assert cam(weights, photos, "--classes", "bus,car", "--out-dir", out) == 0  # the same run resumes
    assert "2 of 3 images already done" in capsys.readouterr().out
    assert cam(weights, photos, "--classes", "cat,dog", "--out-dir", out, "--overwrite") == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out
    assert json.loads((out / "excelseg_run.json").read_text())["classes"] == ["cat", "dog"]
    assert "# command: cam" in (out / "excelseg_config.yaml").read_text()


def test_outputs_without_a_manifest_are_not_trusted(weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos / "p.jpg", 0)
    out = tmp_path / "out"
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 0
    (out / "excelseg_run.json").unlink()  # as an older excelseg left the folder
    capsys.readouterr()
    assert cam(weights, photos, "--classes", "cat", "--out-dir", out) == 2
    err = capsys.readouterr().err
    assert "no run manifest" in err and "--overwrite" in err


# ---- a refusal writes nothing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["cam", "{photo}", "--classes", "cat", "--clip", "{missing}"],
    ["cam", "{photo}", "--classes", "cat", "--clip", "{weights}", "--checkpoint", "{junk}"],
    ["cam", "{photo}", "--classes", "red disc", "--clip", "{weights}", "--checkpoint", "{heads}"],
    ["pseudo-label", "--dataset", "synthetic", "--clip", "{missing}"],
    ["segment", "{photo}", "--checkpoint", "{heads}", "--clip", "{weights}"],
    ["train", "--config", "synthetic", "--resume"],
    ["demo", "--clip", "{missing}"],
])
def test_refusals_leave_no_folder_behind(weights, tmp_path, capsys, argv):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    fill = {"photo": _photo(tmp_path / "p.jpg", 0), "missing": tmp_path / "nope.pt", "weights": weights,
            "junk": tmp_path / "junk.safetensors", "heads": SHIPPED_HEADS}
    out = tmp_path / "deep" / "out"
    assert main([a.format(**fill) for a in argv] + ["--out-dir", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "deep").exists()


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--config", "synthetic", "--out-dir", str(out), "--workers", "0", "--device", "cpu",
                 "--no-progress", "train.iterations=1", "train.batch_size=2", "train.val_every=0",
                 "train.warmup_iters=0", *extra])


def test_a_refused_train_resume_keeps_the_run_record(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    assert json.loads((run / "excelseg_run.json").read_text())["command"] == "train"
    before = snapshot(run)
    capsys.readouterr()
    assert _train(run, "--resume", "train.lr=0.5") == 2
    assert "config differs" in capsys.readouterr().err
    assert snapshot(run) == before  # excelseg_config.yaml, the manifest and the log as they were
    assert _train(run) == 2  # a new run into the folder of another one
    err = capsys.readouterr().err
    assert "holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before
    assert _train(run, "--overwrite", "train.lr=0.5") == 0
    assert "lr: 0.5" in (run / "excelseg_config.yaml").read_text()


# ---- every option checked ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["cam", "{photo}", "--classes", "cat", "--box-threshold", "7"], "refine.box_threshold must lie in [0, 1]"),
    (["cam", "{photo}", "--classes", "cat", "refine.box_threshold=7"], "refine.box_threshold must lie in [0, 1]"),
    (["cam", "{photo}", "--classes", "cat", "--config", "{yaml}"], "refine.box_threshold must lie in [0, 1]"),
    (["cam", "{photo}", "--classes", "cat", "--scales", "1,20"], "cam.scales must lie in (0, 8]"),
    (["cam", "{photo}", "--classes", "cat", "cam.size=9000"], "cam.size must lie in [16, 4096]"),
    (["pseudo-label", "--dataset", "synthetic", "text.keep_ratio=0"], "text.keep_ratio must lie in (0, 1]"),
    (["segment", "{photo}", "--checkpoint", "{heads}", "segment.logits_scale=2"],
     "segment.logits_scale must lie in (0, 1]"),
    (["train", "--dataset", "voc", "train.flip_prob=1.5"], "train.flip_prob must lie in [0, 1]"),
    (["train", "--dataset", "voc", "train.amp=fp8"], "train.amp must be one of auto, off, bf16, fp16"),
    (["train", "--dataset", "voc", "--seed", "-1"], "train.seed must lie in [0, 4294967295]"),
    (["demo", "--synthetic", "--scenes", "0"], "must lie in [1, 100000]"),
    (["describe", "--classes", "cat", "--endpoint", "http://x/v1", "--model", "m", "--out", "{kb}",
      "--temperature", "9"], "must lie in [0, 2]"),
    (["app", "--max-side", "10"], "must lie in [64, 16384]"),
])
def test_out_of_range_values_are_usage_errors_naming_the_range(tmp_path, capsys, argv, message):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("refine:\n  box_threshold: 7\n")
    fill = {"photo": _photo(tmp_path / "p.jpg", 0), "yaml": yaml, "heads": SHIPPED_HEADS, "kb": tmp_path / "kb.json"}
    argv = [a.format(**fill) for a in argv]
    if argv[0] in ("cam", "pseudo-label", "segment", "train", "demo"):
        argv += ["--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_every_numeric_setting_has_a_range():
    import dataclasses

    from excelseg.config import PAPER_VOC, RANGES, SECTIONS

    for section in SECTIONS:
        for f in dataclasses.fields(getattr(PAPER_VOC, section)):
            value = getattr(getattr(PAPER_VOC, section), f.name)
            numeric = isinstance(value, (int, float)) or (isinstance(value, tuple) and
                                                          isinstance(value[0], (int, float)))
            if numeric and not isinstance(value, bool):
                assert f.name in RANGES[section], f"{section}.{f.name} has no valid range"


# ---- servers fail like the CLI ----------------------------------------------------------------------------------


def test_app_on_a_busy_port_is_one_line(capsys):
    pytest.importorskip("gradio")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["app", "--clip", "synthetic", "--port", str(port)]) == 2
    io = capsys.readouterr()
    assert f"port {port} on 127.0.0.1 is in use" in io.err and len(io.err.strip().splitlines()) == 1
    assert "serving" not in io.out and "GRADIO_SERVER_PORT" not in io.err


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "{folder}"], "is a folder"),
    (["--checkpoint", "{junk}"], "not a readable safetensors file"),
    (["--clip", "{junk_pt}"], "not a PyTorch checkpoint"),
])
def test_app_with_unreadable_files_is_one_line(tmp_path, capsys, argv, message):
    pytest.importorskip("gradio")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    fill = {"folder": tmp_path, "junk": tmp_path / "junk.safetensors", "junk_pt": tmp_path / "junk.pt"}
    assert main(["app", *[a.format(**fill) for a in argv], "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_app_says_serving_only_once_it_listens(monkeypatch, capsys):
    pytest.importorskip("gradio")
    import excelseg.app

    order = []

    def refused(*args, **kw):
        raise OSError("Cannot find empty port in range: 7860-7860. You can specify ... GRADIO_SERVER_PORT ...")

    monkeypatch.setattr(excelseg.app, "launch", refused)
    port = free_port()
    assert main(["app", "--clip", "synthetic", "--port", str(port)]) == 2
    io = capsys.readouterr()
    assert "serving" not in io.out and "GRADIO_SERVER_PORT" not in io.err and len(io.err.strip().splitlines()) == 1

    class Page:
        def block_thread(self):
            order.append("blocked")

        def close(self):
            order.append("closed")

    def listening(*args, **kw):
        order.append("listening")
        assert kw.get("block") is False
        return Page()

    monkeypatch.setattr(excelseg.app, "launch", listening)
    assert main(["app", "--clip", "synthetic", "--port", str(port)]) == 0
    assert f"serving http://127.0.0.1:{port}" in capsys.readouterr().out
    assert order == ["listening", "blocked", "closed"]


# ---- offline hints ----------------------------------------------------------------------------------------------


def test_missing_weights_hint_speaks_to_the_cli(tmp_path):
    from excelseg.weights import WeightsNotFoundError, load_clip

    with pytest.raises(WeightsNotFoundError) as info:
        load_clip("ViT-B-16", cache_dir=tmp_path)
    msg = str(info.value)
    assert "pass download=True" not in msg and "--clip synthetic" in msg and "EXCELSEG_OFFLINE" in msg


def test_heads_of_the_shipped_synthetic_clip(weights, tmp_path, capsys):
    """segment finds the shipped synthetic CLIP of such heads by itself (and writes an overlay); cam with other
    weights says which --clip to give instead of a bare sha256."""
    photo = _photo(tmp_path / "p.png", 0, (96, 96))
    out = tmp_path / "seg"
    assert main(["segment", str(photo), "--checkpoint", str(SHIPPED_HEADS), "--out-dir", str(out), "--no-flip",
                 "--scales", "1", "--workers", "0"]) == 0
    assert (out / "p.png").is_file() and (out / "p_overlay.jpg").is_file()
    manifest = json.loads((out / "excelseg_run.json").read_text())
    assert manifest["checkpoint"].startswith("sha256:") and manifest["outputs"]["overlay"] is True
    capsys.readouterr()
    assert main(["cam", str(photo), "--checkpoint", str(SHIPPED_HEADS), "--clip", str(weights),
                 "--out-dir", str(tmp_path / "cam")]) == 2
    err = capsys.readouterr().err
    assert "made with the shipped synthetic CLIP: add --clip synthetic" in err, err


def test_cam_on_the_synthetic_clip_warns_about_unknown_classes(tmp_path, capsys):
    photo = _photo(tmp_path / "p.png", 0, (48, 48))
    assert main(["cam", str(photo), "--clip", "synthetic", "--classes", "cat,red disc", "--out-dir",
                 str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "only knows its" in err and "'cat' is not among them" in err and "red disc'" not in err.split(";")[1]


# ---- smaller items ----------------------------------------------------------------------------------------------


def test_eval_scores_the_synthetic_dataset(tmp_path, capsys):
    from excelseg.data import open_dataset
    from excelseg.io.files import save_label_png

    ds = open_dataset("synthetic", split="val")
    for name in ds.ids[:2]:
        save_label_png(tmp_path / "pred" / f"{name}.png", ds.load_mask(name))
    assert main(["eval", "--dataset", "synthetic", "--pred", str(tmp_path / "pred"), "--allow-missing",
                 "--workers", "0"]) == 0
    result = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert result["evaluated"] == 2 and result["miou"] == pytest.approx(1.0)


def test_prepare_folder_takes_the_generators_labels(tmp_path, capsys):
    from excelseg.synthetic.dataset import write_dataset

    scenes = write_dataset(tmp_path / "scenes", 3, size=32)
    assert main(["prepare", "--dataset", "folder", "--root", str(scenes / "images"), "--labels",
                 str(scenes / "labels.json"), "--masks", str(scenes / "masks"), "--workers", "0"]) == 0
    index = json.loads((scenes / "images" / "excelseg_index.json").read_text())
    assert index["splits"]["all"] == ["00000", "00001", "00002"] and len(index["class_names"]) == 16


def test_segment_help_has_no_unused_option(capsys):
    assert main(["segment", "--help"]) == 0
    out = capsys.readouterr().out
    assert "unused" not in out and "--overlay" in out


def test_one_ctrl_c_message_even_with_forked_workers(monkeypatch, capsys):
    import excelseg.train.trainer as trainer_mod

    trainer = SimpleNamespace(stop_requested=False)
    previous = trainer_mod._install_sigint(trainer)
    try:
        handler = signal.getsignal(signal.SIGINT)
        real = trainer_mod.os.getpid()
        monkeypatch.setattr(trainer_mod.os, "getpid", lambda: real + 1)  # as in a forked DataLoader worker
        handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)
        assert capsys.readouterr().err == "" and not trainer.stop_requested
        monkeypatch.setattr(trainer_mod.os, "getpid", lambda: real)
        handler(signal.SIGINT, None)
        assert capsys.readouterr().err.count("stopping after this iteration") == 1 and trainer.stop_requested
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_deprecated_spelling_warns_once(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["prepare", "voc", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("is deprecated") == 1 and not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_overlay_sheets_are_capped(tmp_path):
    import torch

    from excelseg.jobs.outputs import write_result
    from excelseg.predictor import CamResult

    k, rng = 200, np.random.default_rng(0)
    label = np.zeros((64, 80), np.uint8)
    label[:20, :20] = 7
    grid = torch.from_numpy(rng.random((k, 4, 5), dtype=np.float32))
    result = CamResult([f"c{i}" for i in range(k)], list(range(1, k + 1)), (64, 80), label, grid,
                       grid.numpy(), torch.ones(k + 1, 4, 5))
    rgb = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    write_result(tmp_path, "x", rgb, result)
    size = Image.open(tmp_path / "x_overlay.jpg").size
    assert max(size) <= 2800, size  # 24 heat-maps (as the web page shows), not 200 panels of 256 px
