"""README promises of training (issue 24, items 5 and 7).

* ``--seed`` changes a run (README "train with --seed 0, 1, 2 and report the mean ± std"): seeds 0 and 1 give
  different heads after a few iterations, the same seed gives identical heads — through :class:`Trainer` (data
  order, augmentation, dropout) and through ``excelseg train`` (which also seeds the heads' initialisation).
* TensorBoard (README: "TensorBoard scalars (losses, lr, mIoU, it/s) and overlays in RUN/tb"): two iterations
  with validation write event files whose scalars and overlay images read back; without the package, one notice
  and the run still trains.

The runs use the shipped synthetic CLIP on a four-scene ``folder`` dataset with masks, narrow heads and 64-px
crops, so each training takes well under a second of compute.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from excelseg.cli import main

pytest.importorskip("open_clip")

SMALL = ["train.batch_size=2", "train.crop_size=64", "train.val_every=0", "train.checkpoint_every=0",
         "train.log_every=1", "train.warmup_iters=1", "train.tensorboard=false", "heads.dim=32",
         "heads.decoder_depth=1", "heads.decoder_heads=2", "refine.par_iters=5", "cam.size=64"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six synthetic scenes with masks as a prepared ``folder`` dataset; returns the index path."""
    from excelseg.synthetic import CLASS_NAMES, SceneGenerator

    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    gen = SceneGenerator(size=80, seed=3)
    lines = ["image,classes"]
    for i in range(6):
        sc = gen.scene(i)
        Image.fromarray(np.asarray(sc.image)).save(root / "images" / f"s{i}.png")
        Image.fromarray(np.asarray(sc.mask).astype(np.uint8)).save(root / "masks" / f"s{i}.png")
        lines.append(f"s{i}.png," + ";".join(sc.names))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    index = root / "index.json"
    assert main(["prepare", "--dataset", "folder", "--root", str(root / "images"), "--labels",
                 str(root / "labels.csv"), "--masks", str(root / "masks"), "--classes", ",".join(CLASS_NAMES),
                 "--out", str(index), "--workers", "0"]) == 0
    return index


@pytest.fixture(scope="module")
def clip():
    from excelseg import load_clip

    return load_clip("synthetic")


def _config(*overrides: str):
    from excelseg.config import apply_overrides, load_config

    return apply_overrides(load_config("synthetic"), [*SMALL, *overrides])


def _trainer(clip, index, out, cfg, init_seed=123, **kw):
    from excelseg.data import open_dataset
    from excelseg.model import ExcelModel
    from excelseg.train import Trainer

    ds = open_dataset("folder", index=str(index), with_mask=False)
    gen = torch.Generator().manual_seed(7)
    text = torch.nn.functional.normalize(torch.randn(len(ds.class_names) + 4, clip.model.visual.output_dim,
                                                     generator=gen), dim=-1)
    torch.manual_seed(init_seed)  # the same initial heads for every run: only train.seed differs
    model = ExcelModel(clip.model.visual, text, len(ds.class_names), cfg)
    return Trainer(model, cfg, ds, out, progress=False, log=kw.pop("log", lambda s: None), **kw)


def _heads(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.heads.state_dict().items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- item 5: --seed changes a run -----------------------------------------------------------------------------


def test_train_seed_changes_the_heads_and_the_same_seed_repeats_them(clip, folder, tmp_path):
    runs = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        t = _trainer(clip, folder, tmp_path / name, _config(f"train.seed={seed}"))
        start = _heads(t)
        t.fit(3)
        runs[name] = _heads(t)
        assert not _equal(start, runs[name]), "three iterations changed nothing: the comparison is vacuous"
    assert _equal(runs["s0"], runs["s0_again"]), "the same seed gave different heads"
    differ = [k for k in runs["s0"] if not torch.equal(runs["s0"][k], runs["s1"][k])]
    assert len(differ) == len(runs["s0"]), f"seeds 0 and 1 gave identical tensors: {set(runs['s0']) - set(differ)}"


def test_cli_seed_also_seeds_the_initial_heads(folder, tmp_path):
    """``excelseg train --seed``: same seed twice in one process = identical heads; seeds 0 and 1 differ from the
    very initialisation on (the reference seeds before building the model, EXCEL_SPEC §5.3)."""
    from safetensors.torch import load_file

    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        torch.manual_seed(1000 + len(name))  # whatever the process did before must not matter
        assert main(["train", "--dataset", "folder", "--index", str(folder), "--split", "all", "--clip", "synthetic", "--config",
                     "synthetic", "--out-dir", str(out), "--seed", str(seed), "--iterations", "1", "--workers", "0",
                     "--no-progress", "--device", "cpu", "--val-split", "none", "train.lr=0.000000000001", *SMALL]) == 0
        (ckpt,) = sorted((out / "checkpoints").glob("*.safetensors"))
        return load_file(ckpt)

    # train.lr=1e-12 (a rate must be > 0): the weights after the step are the initial ones to ~1e-12, so this
    # compares initialisations
    a, b, c = run("a", 0), run("bb", 0), run("ccc", 1)
    assert _equal(a, b), "excelseg train --seed 0 twice gave different heads"
    random_init = [k for k in a if a[k].numel() > 1 and a[k].float().std() > 0]  # not the 0 / 1 constants
    assert random_init and not [k for k in random_init if torch.equal(a[k], c[k])], \
        "seeds 0 and 1 share initial heads"


# ---- item 7: TensorBoard --------------------------------------------------------------------------------------


def test_tensorboard_scalars_and_overlays_read_back(clip, folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from excelseg.data import open_dataset

    cfg = _config("train.val_every=2", "train.val_limit=2", "train.tensorboard=true")
    lines: list[str] = []
    t = _trainer(clip, folder, tmp_path, cfg, val_ds=open_dataset("folder", index=str(folder)), log=lines.append)
    t.fit(2)
    if t.writer is not None:
        t.writer.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, f"no event file in {tmp_path / 'tb'}"
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/seg", "train/div", "train/lr", "train/it_per_s", "val/pseudo_miou",
                "val/seg_miou"):
        assert tag in tags["scalars"], f"{tag} missing; scalars: {tags['scalars']}"
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert all(0 <= e.value <= 1 for tag in ("val/pseudo_miou", "val/seg_miou") for e in acc.Scalars(tag))
    assert all(e.value > 0 for e in acc.Scalars("train/it_per_s"))
    assert all(e.value > 0 for e in acc.Scalars("train/lr"))
    overlays = [tag for tag in tags["images"] if tag.startswith("val/")]
    assert {"val/0_pseudo", "val/0_seg"} <= set(overlays), tags["images"]
    for tag in overlays:
        (img,) = acc.Images(tag)
        assert img.step == 2 and img.width > 0 and img.height > 0 and img.encoded_image_string[:4] == b"\x89PNG"
    assert not any("not installed" in s for s in lines)


def test_without_tensorboard_one_notice_and_training_still_works(folder, tmp_path, monkeypatch, capsys):
    """``torch.utils.tensorboard`` made unimportable (as without the package): ``excelseg train`` prints one
    notice and finishes its iterations."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `from torch.utils.tensorboard …` fails
    capsys.readouterr()
    assert main(["train", "--dataset", "folder", "--index", str(folder), "--split", "all", "--clip", "synthetic",
                 "--config", "synthetic", "--out-dir", str(tmp_path), "--iterations", "2", "--workers", "0",
                 "--no-progress", "--device", "cpu", "--val-split", "none", *SMALL, "train.tensorboard=true"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    notices = [line for line in text.splitlines() if "tensorboard" in line.lower() and "not installed" in line]
    assert len(notices) == 1, text[-3000:]
    assert "pip install tensorboard" in notices[0]
    assert "done: 2 iterations" in text
    assert (tmp_path / "checkpoints" / "iter_000002.safetensors").is_file()
    assert not (tmp_path / "tb").exists()
