"""Resume promises of training (issue 24, items 2 and 3; docs/training.md "Beyond the reference").

* 8 iterations straight = 6 + ``--resume`` + 2 bit for bit when an epoch boundary falls inside the resumed part
  (15 labelled images, batch 2: an epoch is 7 iterations), with the same images in the same order after resume;
* every epoch is reshuffled (``DistributedSampler.set_epoch``): epochs 0 and 1 are two different orders of the
  same images;
* the AMP GradScaler's state (scale, growth tracker) is in the state file and restored (``train.amp=fp16``, which
  enables the scaler on CPU too), and fp16 training resumes bit for bit;
* a read-only run folder stops the run with a one-line :class:`TrainingError` naming the folder and the problem,
  and leaves the last checkpoint, ``latest.json`` and nothing else behind.

The processes' disjoint images (item 2) are checked with two real gloo processes in tests/test_train.py
(``test_ddp_ranks_read_disjoint_images_in_every_epoch``). The trainer runs the tiny random CLIP of
tests/test_train.py on a miniature VOC tree; ids are recorded by wrapping the training set's ``__getitem__``.
"""

from __future__ import annotations

import errno
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from excelseg.io.checkpoint import load_heads
from excelseg.train import TrainingError, latest_checkpoint
from excelseg.train.data import TrainSet
from test_pseudo_label import make_voc
from test_train import CFG, TRAIN, heads_state, make_trainer

COPIES = 3  # 5 sample images × 3 = 15 labelled train ids
EPOCH_ITERS = 7  # batch 2 with drop_last: 15 // 2 iterations per epoch (one image left out per epoch)
ACROSS = CFG.with_(train=replace(TRAIN, iterations=8, checkpoint_every=100))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), copies=COPIES)


@pytest.fixture
def reads(monkeypatch):
    """Every image the training set hands out, as (epoch, image id), in order (``workers=0``: in this process).
    Clear it between runs."""
    seen: list[tuple[int, str]] = []
    real = TrainSet.__getitem__

    def recording(self, i):
        seen.append((self.epoch, self.base.ids[self.indices[i]]))
        return real(self, i)

    monkeypatch.setattr(TrainSet, "__getitem__", recording)
    return seen


def all_ids(root) -> list[str]:
    return [line for line in (Path(root) / "ImageSets" / "Segmentation" / "train.txt").read_text().split() if line]


def assert_same_training_state(a, b) -> None:
    """Heads and the whole optimiser state (AdamW moments, step counts, groups) equal bit for bit."""
    ha, hb = heads_state(a), heads_state(b)
    assert ha.keys() == hb.keys()
    assert not [k for k in ha if not torch.equal(ha[k], hb[k])], "heads differ"
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, sa in oa["state"].items():
        assert sa.keys() == ob["state"][i].keys()
        assert all(torch.equal(sa[k], ob["state"][i][k]) for k in sa), f"optimiser state of parameter {i}"


def test_resume_across_an_epoch_boundary_is_bit_identical(voc, tmp_path, reads):
    """8 straight vs 6 + resume + 2: epoch 0 ends after iteration 7, so the resumed part finishes epoch 0 and
    starts epoch 1; the resumed trainer starts from other initial heads (the checkpoint must win)."""
    assert len(all_ids(voc)) == 15
    straight = make_trainer(voc, tmp_path / "straight", cfg=ACROSS)
    straight.fit()
    straight_reads = list(reads)
    assert len(straight_reads) == 8 * 2
    assert [e for e, _ in straight_reads] == [0] * (EPOCH_ITERS * 2) + [1] * 2

    first = make_trainer(voc, tmp_path / "run", cfg=ACROSS)
    first.fit(6)
    assert (first.iteration, first.epoch) == (6, 0)
    reads.clear()
    resumed = make_trainer(voc, tmp_path / "run", cfg=ACROSS, seed=5)
    resumed.resume(tmp_path / "run")
    assert (resumed.iteration, resumed.epoch) == (6, 0)
    resumed.fit()
    assert resumed.iteration == 8 and (resumed.epoch, resumed.consumed) == (1, 1), "the epoch did not advance"
    assert reads == straight_reads[6 * 2:], "after resume the images differ from the uninterrupted run's"
    assert_same_training_state(straight, resumed)
    init = heads_state(make_trainer(voc, tmp_path / "init", cfg=ACROSS))
    assert any(not torch.equal(init[k], v) for k, v in heads_state(straight).items()), "training changed nothing"


def test_every_epoch_is_a_new_order_of_the_same_images(voc, tmp_path, reads):
    """Batch 3 (15 = 5 × 3: every image in every epoch), two epochs: each a permutation of all 15 ids, in two
    different orders (``set_epoch`` reached; the reference replays epoch 0's order)."""
    cfg = CFG.with_(train=replace(TRAIN, batch_size=3, iterations=10, checkpoint_every=100))
    trainer = make_trainer(voc, tmp_path, cfg=cfg)
    trainer.fit()
    assert (trainer.epoch, trainer.consumed) == (1, 5)
    epochs = [[name for e, name in reads if e == epoch] for epoch in (0, 1)]
    assert len(reads) == 30 and all(sorted(ids) == sorted(all_ids(voc)) for ids in epochs), reads
    assert epochs[0] != epochs[1], "epoch 1 replayed epoch 0's order"


def test_fp16_grad_scaler_state_is_saved_and_restored(voc, tmp_path):
    """``train.amp=fp16`` (GradScaler enabled, on CPU too). The scale is moved off its default (65536) through
    the scaler's public ``update(new_scale=)`` after iteration 5; iteration 6 then grows the tracker. The state
    file holds that scaler state and a fresh trainer restores it (checked on the state itself: a power-of-two
    scale changes the unscaled gradients only when a step overflows or underflows, which these do not); and fp16
    training resumes deterministically, 6 + resume + 2 equal to 8 straight bit for bit."""
    cfg = CFG.with_(train=replace(TRAIN, iterations=8, checkpoint_every=100, amp="fp16"))
    low = 2.0 ** 10
    fresh = make_trainer(voc, tmp_path / "fresh", cfg=cfg)
    assert fresh.scaler.is_enabled()
    default = fresh.scaler.state_dict()

    straight = make_trainer(voc, tmp_path / "straight", cfg=cfg)
    straight.fit(5)
    straight.scaler.update(new_scale=low)
    straight.fit()

    first = make_trainer(voc, tmp_path / "run", cfg=cfg)
    first.fit(5)
    first.scaler.update(new_scale=low)
    first.fit(6)
    saved = torch.load(latest_checkpoint(tmp_path / "run")["state"], weights_only=True)["scaler"]
    assert saved == first.scaler.state_dict()
    assert saved["scale"] == low and saved["_growth_tracker"] == 6  # 6 finite steps, none skipped
    assert (saved["scale"], saved["_growth_tracker"]) != (default["scale"], default["_growth_tracker"])

    resumed = make_trainer(voc, tmp_path / "run", cfg=cfg, seed=5)
    resumed.resume(tmp_path / "run")
    assert resumed.scaler.state_dict() == saved
    at_resume = heads_state(resumed)
    resumed.fit()
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    assert_same_training_state(straight, resumed)
    assert any(not torch.equal(at_resume[k], v) for k, v in heads_state(resumed).items()), "no step after resume"


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` behave as on a read-only mount for this process: creating, writing, renaming, deleting or
    chmod-ing anything under it fails with EROFS, as the kernel answers (even deleting a file that is not there).
    Reading still works. (chmod cannot do this: the tests run as root.)"""
    folder = folder.resolve()

    def inside(path) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        p = Path(os.fsdecode(path)).resolve()
        return p == folder or folder in p.parents

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    real_open, real_os_open = io.open, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *a, **k):
        if inside(file) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & writes and inside(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def guard(real):
        def call(*paths, **k):
            for p in paths[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and inside(p):
                    refuse(p)
            return real(*paths, **k)
        return call

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


def test_read_only_run_folder_stops_and_keeps_the_last_checkpoint(voc, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(voc, run, cfg=CFG)  # checkpoints every 2 iterations
    trainer.fit(2)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    pointer = (run / "latest.json").read_text()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(TrainingError) as info:
        read_only(mp, run)
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write the checkpoint of iteration 4 to {run / 'checkpoints'}" in message
    assert "(Read-only file system)" in message
    assert f"the previous checkpoint {run / 'checkpoints' / 'iter_000002.safetensors'} is intact" in message
    assert trainer.iteration == 4
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before  # no temp or half files
    assert (run / "latest.json").read_text() == pointer and json.loads(pointer)["iteration"] == 2
    state, meta = load_heads(run / "checkpoints" / "iter_000002.safetensors")
    assert meta["iteration"] == "2" and state
    again = make_trainer(voc, run, cfg=CFG, seed=5)
    again.resume(run)  # the kept pair resumes
    assert again.iteration == 2
    again.fit()
    assert again.iteration == 4 and json.loads((run / "latest.json").read_text())["iteration"] == 4
