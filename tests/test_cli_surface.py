"""The CLI's surface (issue: one vocabulary, fast help): every subcommand's --help, lazy imports, one meaning per
option, the deprecated spellings kept for one release, configuration files and overrides."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from excelseg.cli import build_parser, command_modules, main
from excelseg.config import PAPER_COCO, PAPER_VOC, ConfigError, apply_overrides, dump_config, load_config

COMMANDS = ["cam", "pseudo-label", "segment", "prepare", "bank", "describe", "train", "eval", "eval-cams",
            "import-checkpoint", "demo", "app", "train-clip"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_is_registered_and_listed(capsys):
    assert sorted(_subparsers(build_parser())) == sorted(COMMANDS)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert "common" not in command_modules()


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS] + [["bank", a, "--help"]
                                                                       for a in ("build", "import", "info")])
def test_every_help_page_renders(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: excelseg ") and len(out.splitlines()) > 5


def test_help_does_not_import_torch():
    """``excelseg --help`` answers without loading torch, numpy or open_clip (what made it take 4 s)."""
    code = ("import sys; from excelseg.cli import main; rc = main(['--help']); "
            f"[main([c, '--help']) for c in {COMMANDS!r}]; "
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'open_clip', 'PIL') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_option_vocabulary_is_consistent():
    """--out is always a file, --out-dir always a folder; --batch-size, --workers, --device one spelling each."""
    folders = {"cam", "pseudo-label", "segment", "demo", "train"}
    for name, sub in _subparsers(build_parser()).items():
        parsers = _subparsers(sub) or {name: sub}
        for p in parsers.values():
            opts = {o: a for a in p._actions for o in a.option_strings}
            if name in folders:
                assert "--out-dir" in opts and opts["--out"].help == argparse.SUPPRESS, name
            else:
                assert "--out-dir" not in opts, name
            visible = {o for o, a in opts.items() if a.help != argparse.SUPPRESS}
            assert not visible & {"--batch", "--num-workers", "--gpu", "--preset"}, (name, visible)
            if "--dataset" in opts:
                assert {"--root", "--workers"} <= set(opts), name


def test_deprecated_spellings_still_work_with_a_warning(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    # prepare voc ROOT -> prepare --dataset voc --root ROOT (fails on the empty folder, after the rewrite)
    assert main(["prepare", "voc", str(photos)]) == 2
    err = capsys.readouterr().err
    assert "'prepare voc ROOT' is deprecated" in err and "--dataset voc --root ROOT" in err
    # --out for a folder, --preset, train-clip --batch: parsed into the new destinations, with a warning
    ns = build_parser().parse_args(["cam", "x.jpg", "--classes", "a", "--out", "o"])
    assert ns.out_dir == "o"
    ns = build_parser().parse_args(["train-clip", "--batch", "8"])
    assert ns.batch_size == 8
    err = capsys.readouterr().err
    assert "--out is deprecated" in err and "--batch is deprecated" in err


# ---- configuration files ---------------------------------------------------------------------------------------


def test_shipped_configs_equal_the_presets():
    assert load_config("voc") == PAPER_VOC and load_config(None) == PAPER_VOC
    assert load_config("coco") == PAPER_COCO
    syn = load_config("synthetic")
    assert syn.cam.size == (96, 96) and syn.text.template == "a photo of a {}."
    assert syn.refine == PAPER_VOC.refine


def test_overrides_are_typed_and_unknown_keys_list_the_valid_ones(tmp_path):
    cfg = apply_overrides(PAPER_VOC, ["cam.flip=true", "cam.size=448", "cam.scales=[1, 0.75]",
                                      "refine.box_threshold=0.85", ("text.keep_ratio", 0.5)])
    assert cfg.cam.flip is True and cfg.cam.size == (448, 448) and cfg.cam.scales == (1.0, 0.75)
    assert cfg.refine.box_threshold == 0.85 and cfg.text.keep_ratio == 0.5
    with pytest.raises(ConfigError, match=r"unknown setting cam\.flp; valid cam keys: .*flip"):
        apply_overrides(PAPER_VOC, ["cam.flp=true"])
    with pytest.raises(ConfigError, match="must be true or false"):
        apply_overrides(PAPER_VOC, ["cam.flip=3"])
    with pytest.raises(ConfigError, match="must be an integer"):
        apply_overrides(PAPER_VOC, ["refine.par_iters=2.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("cams:\n  flip: true\n")
    with pytest.raises(ConfigError, match="unknown section.*cams.*valid: text, cam, refine, heads"):
        load_config(bad)


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = apply_overrides(PAPER_COCO, ["cam.flip=true", "cam.scales=[1, 0.5, 1.5]", "text.template=a {} here."])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg, note="test"))
    assert load_config(path) == cfg


def test_cli_refuses_unknown_override_before_loading_weights(tmp_path, capsys):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    rc = main(["cam", str(img), "--classes", "a", "--out-dir", str(tmp_path / "o"), "--clip", "nonexistent.pt",
               "cam.flp=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown setting cam.flp" in err and "nonexistent" not in err


def test_exports_are_complete_and_resolve_lazily():
    import importlib

    import excelseg

    # __all__, the lazy-import table and dir() list the same names, once each
    assert len(set(excelseg.__all__)) == len(excelseg.__all__)
    assert set(excelseg.__all__) == set(excelseg._EXPORTS) | {"__version__"}
    assert dir(excelseg) == sorted(excelseg.__all__)
    for name, module in excelseg._EXPORTS.items():  # each resolves to the object of the module it names
        assert getattr(excelseg, name) is getattr(importlib.import_module(f"excelseg.{module}"), name)


def test_gpu_suite_smoke_on_cpu(tmp_path):
    """benchmarks/gpu_suite.py runs end to end with --device cpu (tiny model): the GPU run will not die on a typo."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--tiny", "--no-train",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["cam"]
    assert {(r["batch"], r["precision"]) for r in rows} == {(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_train_command_accepts_the_synthetic_dataset_and_defaults_from_the_config():
    ns = build_parser().parse_args(["train", "--config", "synthetic", "--out-dir", "o"])
    assert ns.dataset is None and ns.root is None  # train.dataset of the config decides
    assert load_config("synthetic").train.dataset == "synthetic" and load_config("voc").train.dataset == "voc"
    assert build_parser().parse_args(["train", "--dataset", "synthetic", "--out-dir", "o"]).dataset == "synthetic"
    ns = build_parser().parse_args(["train-clip", "--captions", "mixed", "--hard-negatives", "0.5",
                                    "--image-size", "128", "--patch-size", "8"])
    assert (ns.captions, ns.hard_negatives, ns.image_size, ns.patch_size) == ("mixed", 0.5, 128, 8)
    ns = build_parser().parse_args(["train-clip", "--init", "synthetic", "--steps", "5", "--schedule-steps", "9"])
    assert (ns.init, ns.steps, ns.schedule_steps) == ("synthetic", 5, 9)
    assert main(["train-clip", "--steps", "5", "--schedule-steps", "4"]) == 2  # a schedule shorter than the run
