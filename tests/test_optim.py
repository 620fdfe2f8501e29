"""The reference's optimiser groups and warm-up + poly schedule (EXCEL_SPEC §5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from excelseg.config import PAPER_COCO, PAPER_VOC
from excelseg.heads import ExcelHeads
from excelseg.train.optim import build_optimizer, group_lrs, lr_multiplier, set_lrs
from parity_kit import GOLDEN


def test_logged_lr_at_iteration_200():
    """The reference logs group 0's lr at iteration 200 (n_iter 199, after 199 steps) with 4 significant
    digits: 9.934e-05 (VOC, poly) and 9.950e-05 (COCO, still in its 200-step warm-up)."""
    assert f"{group_lrs(199, PAPER_VOC.train)[0]:.3e}" == "9.934e-05"
    assert f"{group_lrs(199, PAPER_COCO.train)[0]:.3e}" == "9.950e-05"
    # the formula itself, in float64: 1e-4 · (1 − 199/30000)
    assert group_lrs(199, PAPER_VOC.train)[0] == pytest.approx(1e-4 * (1 - 199 / 30000), rel=1e-12)


def test_schedule_shape():
    cfg = PAPER_VOC.train
    assert lr_multiplier(0, cfg) == pytest.approx(1e-6, rel=1e-9)  # warm-up starts at ratio
    assert lr_multiplier(50, cfg) == pytest.approx(1 - 50 / 30000, rel=1e-12)  # poly, not shifted by warm-up
    assert lr_multiplier(30000, cfg) == 0.0
    base = group_lrs(10, cfg)
    assert base[2] == base[3] == pytest.approx(10 * base[0], rel=1e-12)


def test_lrs_match_train_steps_golden():
    """``lr`` (5, 4) of the parity kit's five reference steps (README §4.6; rel 1e-6 per §6.1)."""
    path = GOLDEN / "train_steps.npz"
    if not path.is_file():
        pytest.skip("parity kit not found")
    g = np.load(path)
    heads = ExcelHeads(3, num_layers=2, in_dim=16, dim=8, heads=2)
    opt = build_optimizer(heads, PAPER_VOC.train)
    for k in range(5):
        set_lrs(opt, k, PAPER_VOC.train)
        got = np.array([grp["lr"] for grp in opt.param_groups])
        np.testing.assert_allclose(got, g["lr"][k], rtol=1e-6)
        assert got[3] == pytest.approx(g["lr_heads"][k], rel=1e-6)


def test_groups_hold_every_trainable_parameter_once():
    heads = ExcelHeads(3, num_layers=2, in_dim=16, dim=8, heads=2)
    opt = build_optimizer(heads, PAPER_VOC.train)
    assert [len(g["params"]) for g in opt.param_groups[:3]] == [0, 0, 0]
    ids = [id(p) for p in opt.param_groups[3]["params"]]
    assert sorted(ids) == sorted(id(p) for p in heads.parameters()) and len(set(ids)) == len(ids)
    # decoder first, then adapter (the reference's order)
    assert ids[0] == id(next(heads.decoder.parameters()))
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert isinstance(opt, torch.optim.AdamW)
