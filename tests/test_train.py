"""The trainer (excelseg.train, ``excelseg train``) on tiny random CLIPs and the miniature VOC tree:
gradient flow, one step lowers the loss, bf16 / fp16 autocast (the step and the trainer on the CPU, against fp32),
bit-identical resume, Ctrl-C, NaN stop, atomic checkpoints on a full disk, changed-config resume, bad inputs,
batched pseudo-labels, a CLI run end to end (train → predict → eval), 2 forked gloo processes (averaged gradients,
disjoint images, a failed checkpoint stops both) and a 2-process gloo torchrun run. More resume promises (across an
epoch boundary, fp16 scaler, read-only folder): tests/test_promises_resume.py."""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from excelseg.cli import main
from excelseg.config import PAPER_VOC, CamConfig, HeadsConfig, RefineConfig, TrainConfig, dump_config
from excelseg.data import open_dataset
from excelseg.model import ExcelModel
from excelseg.preprocess import denormalize_uint8
from excelseg.pseudo import labels_from_cams
from excelseg.refine import box_mask, refine_cams
from excelseg.train import Trainer, TrainingError
from excelseg.train.step import training_losses
from numerics import F32_REL, F64_REL, assert_rel_close
from test_pseudo_label import make_voc
from tiny_clip import save_tiny, tiny_model

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = {"layers": 4, "image": 32, "patch": 8, "heads": 2, "width": 64, "embed": 32}
TRAIN = TrainConfig(iterations=4, batch_size=2, crop_size=32, warmup_iters=2, lvc_switch_iter=1,
                    self_affinity_iter=3, val_every=0, checkpoint_every=2, log_every=1, tensorboard=False)
CFG = PAPER_VOC.with_(cam=replace(CamConfig(), size=(32, 32), svc_last_blocks=2),
                      refine=replace(RefineConfig(), affinity_layers=3, par_iters=5),
                      heads=HeadsConfig(dim=16, decoder_heads=2, decoder_depth=1), train=TRAIN)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_excel(num_classes: int = 20, seed: int = 0, cfg=CFG) -> ExcelModel:
    clip = tiny_model(0, **TINY)
    text = F.normalize(torch.randn(num_classes + 5, 32, generator=torch.Generator().manual_seed(7)), dim=-1)
    torch.manual_seed(seed)  # head initialisation
    return ExcelModel(clip.visual, text, num_classes, cfg)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), copies=2)


def train_ds(root):
    return open_dataset("voc", root, split="train")


def batch(seed: int = 3, n: int = 2, classes: int = 20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    cls = torch.zeros(n, classes)
    cls[0, [2, 7]] = 1
    cls[1:, 11] = 1
    return x, cls


# ---- the step ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_iter", [0, 1, 3])  # static; LVC + P-guided; LVC + own-prediction affinity target
def test_gradients_reach_every_head_parameter_and_no_clip_parameter(n_iter):
    model = tiny_excel().train()
    x, cls = batch()
    res = training_losses(model, x, cls, n_iter, TRAIN)
    res.loss.backward()
    for name, p in model.heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    clip_params = list(model.encoder.parameters())
    assert clip_params and all(p.grad is None and not p.requires_grad for p in clip_params)


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    from excelseg.train.optim import build_optimizer, set_lrs

    model = tiny_excel().eval()  # no dropout: the same function before and after the step
    x, cls = batch()
    cfg = replace(TRAIN, warmup_iters=0, lr=1e-4)
    opt = build_optimizer(model.heads, cfg)
    before = training_losses(model, x, cls, 0, cfg)
    opt.zero_grad()
    before.loss.backward()
    set_lrs(opt, 0, cfg)
    opt.step()
    after = training_losses(model, x, cls, 0, cfg)
    assert torch.equal(after.pseudo, before.pseudo)  # static pseudo-labels: frozen CLIP only
    assert float(after.loss.detach()) < float(before.loss.detach())


LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def refinement_spy(monkeypatch, model: ExcelModel) -> list[tuple[str, bool, tuple]]:
    """Record each call of the refinement's entry points — the transition matrix, the batched pseudo-labels (box
    mask, PAR) and the LVC re-run — as ``(name, autocast on?, floating dtypes of its tensor arguments)``."""
    import excelseg.model as model_mod

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kw):
            dtypes = tuple(a.dtype for a in (*args, *kw.values()) if torch.is_tensor(a) and a.is_floating_point())
            calls.append((name, torch.is_autocast_enabled("cpu"), dtypes))
            return fn(*args, **kw)
        return wrapped

    for name in ("transition_matrix", "pseudo_labels"):
        monkeypatch.setattr(model_mod, name, spy(name, getattr(model_mod, name)))
    monkeypatch.setattr(model.encoder, "calibrate", spy("calibrate", model.encoder.calibrate))
    return calls


def assert_refinement_in_fp32(calls, lvc: bool) -> None:
    names = {c[0] for c in calls}
    assert {"transition_matrix", "pseudo_labels"} <= names and ("calibrate" in names) == lvc, names
    for name, autocast_on, dtypes in calls:
        assert not autocast_on and all(d == torch.float32 for d in dtypes), (name, autocast_on, dtypes)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("n_iter", [0, 15000, 25000])
def test_bf16_autocast_step_keeps_the_refinement_in_fp32(n_iter, amp, monkeypatch):
    """Under autocast (bf16 or fp16) the frozen pass runs in low precision (the patch embedding's output dtype),
    but CAMs, refinement and the LVC re-run must get fp32 inputs with autocast off (a bf16 tensor meeting an fp32
    one outside autocast crashed the CUDA step); the heads still get gradients."""
    model = tiny_excel().train()
    x, cls = batch()
    calls = refinement_spy(monkeypatch, model)
    embed = []
    hook = model.encoder.visual.conv1.register_forward_hook(lambda m, a, out: embed.append(out.dtype))
    with torch.autocast("cpu", dtype=LOW[amp]):
        out = model(x)
        assert out.features.dtype == torch.float32 and out.attn.dtype == torch.float32
        res = training_losses(model, x, cls, n_iter, TRAIN, out=out)
    hook.remove()
    assert embed == [LOW[amp]]
    assert_refinement_in_fp32(calls, lvc=n_iter >= TRAIN.lvc_switch_iter)
    assert torch.isfinite(res.loss) and res.loss.dtype == torch.float32
    res.loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters() if p.requires_grad)


def test_batch_without_classes_is_all_background_and_finite():
    model = tiny_excel().train()
    x, _ = batch()
    res = training_losses(model, x, torch.zeros(2, 20), 0, TRAIN)
    assert (res.pseudo == 0).all() and torch.isfinite(res.loss)
    res.loss.backward()


def test_crop_smaller_than_a_patch_is_refused():
    model = tiny_excel()
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        training_losses(model, torch.randn(1, 3, 4, 32), torch.ones(1, 20), 0, TRAIN)


@torch.no_grad()
def test_batched_pseudo_labels_equal_the_per_image_training_free_path():
    """The batched on-device labels vs :func:`labels_from_cams` image by image (float64: equality is exact)."""
    model = tiny_excel().double().eval()
    x, cls = batch(n=3)
    x = x.double()
    cls[2] = 0  # an image without classes in the same batch
    out = model(x)
    cams = model.static_cams(out)
    trans, _, _ = model.transition(out, guided=True)
    par_img = denormalize_uint8(x)
    got = model.pseudo_labels(cams, cls, trans, par_img, (32, 32), 0.79)
    for b in range(3):
        present = torch.nonzero(cls[b] > 0).flatten()
        sel = cams[b, present][None]
        refined = refine_cams(sel, trans[b][None], box_mask(sel, 0.79))[0]
        ref = model.config.refine
        _, want = labels_from_cams(refined, par_img[b], (32, 32), values=[0] + (present + 1).tolist(),
                                   par_iters=ref.par_iters)
        assert torch.equal(got[b], want), b
    assert (got[2] == 0).all()


# ---- the trainer ----------------------------------------------------------------------------------------------


def make_trainer(root, out, cfg=CFG, seed=0, **kw) -> Trainer:
    return Trainer(tiny_excel(seed=seed, cfg=cfg), cfg, train_ds(root), out, log=kw.pop("log", lambda s: None),
                   progress=False, **kw)


def heads_state(trainer):
    return {k: v.clone() for k, v in trainer.heads.state_dict().items()}


def test_resume_is_bit_identical(voc, tmp_path):
    """4 iterations straight vs 2 + resume + 2 (dropout on, LVC switch and affinity-target switch inside)."""
    straight = make_trainer(voc, tmp_path / "a")
    straight.fit()
    first = make_trainer(voc, tmp_path / "b")
    first.fit(2)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["iteration"] == 2
    resumed = make_trainer(voc, tmp_path / "b", seed=5)  # other initial heads: the checkpoint must win
    resumed.resume(tmp_path / "b")
    assert resumed.iteration == 2
    resumed.fit()
    a, b = heads_state(straight), heads_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # and the run really changed the weights
    init = heads_state(make_trainer(voc, tmp_path / "c"))
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_ctrl_c_writes_a_checkpoint_and_resumes(voc, tmp_path):
    def on_log(line):
        if line.startswith("iter 1/"):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: finish this iteration, checkpoint, stop

    trainer = make_trainer(voc, tmp_path, cfg=CFG.with_(train=replace(TRAIN, checkpoint_every=100)), log=on_log)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.iteration == 1
    assert json.loads((tmp_path / "latest.json").read_text())["iteration"] == 1
    assert (tmp_path / "checkpoints" / "iter_000001.safetensors").is_file()
    again = make_trainer(voc, tmp_path, cfg=CFG.with_(train=replace(TRAIN, checkpoint_every=100)))
    again.resume(tmp_path)
    again.fit()
    assert again.iteration == 4


def test_nan_loss_stops_with_a_clear_message_keeping_the_last_checkpoint(voc, tmp_path, monkeypatch):
    import excelseg.train.trainer as train_mod

    real = train_mod.training_losses

    def poisoned(model, images, labels, n_iter, cfg, **kw):
        res = real(model, images, labels, n_iter, cfg, **kw)
        if n_iter == 3:
            res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(train_mod, "training_losses", poisoned)
    trainer = make_trainer(voc, tmp_path)
    good = None
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 3 .*last good checkpoint is .*iter_000002"):
        trainer.fit()
    good = json.loads((tmp_path / "latest.json").read_text())
    assert good["iteration"] == 2 and not (tmp_path / "checkpoints" / "iter_000004.safetensors").exists()


def test_full_disk_keeps_the_previous_checkpoint(voc, tmp_path, monkeypatch):
    from excelseg.io.checkpoint import load_heads

    trainer = make_trainer(voc, tmp_path)
    trainer.fit(2)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    pointer = (tmp_path / "latest.json").read_text()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError, match=r"No space left on device.*iter_000002.safetensors is intact"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no temp files left
    assert (tmp_path / "latest.json").read_text() == pointer
    state, meta = load_heads(tmp_path / "checkpoints" / "iter_000002.safetensors")
    assert meta["iteration"] == "2" and state


def test_resume_with_a_changed_config_needs_force(voc, tmp_path):
    make_trainer(voc, tmp_path).fit(2)
    changed = CFG.with_(train=replace(TRAIN, lr=2e-4))
    with pytest.raises(TrainingError, match=r"train.lr: 0.0001 -> 0.0002.*--force"):
        make_trainer(voc, tmp_path, cfg=changed).resume(tmp_path)
    lines = []
    t = make_trainer(voc, tmp_path, cfg=changed, log=lines.append)
    t.resume(tmp_path, force=True)
    assert any("config changed train.lr" in line for line in lines) and t.iteration == 2


def test_dataset_without_image_level_labels_is_refused(voc, tmp_path):
    ds = open_dataset("voc", voc, split="test")  # test.txt: one image, no label
    with pytest.raises(TrainingError, match="has no image-level labels"):
        Trainer(tiny_excel(), CFG, ds, tmp_path, progress=False)


def test_crop_and_batch_settings_are_checked(voc, tmp_path):
    with pytest.raises(TrainingError, match="smaller than one 8x8 patch"):
        make_trainer(voc, tmp_path, cfg=CFG.with_(train=replace(TRAIN, crop_size=4)))
    with pytest.raises(TrainingError, match="multiple of processes"):
        make_trainer(voc, tmp_path, cfg=CFG.with_(train=replace(TRAIN, batch_size=3, accumulation=2)))


def test_gradient_accumulation_runs(voc, tmp_path):
    t = make_trainer(voc, tmp_path, cfg=CFG.with_(train=replace(TRAIN, accumulation=2, iterations=2)))
    assert t.micro_batch == 1
    t.fit()
    assert t.iteration == 2 and t.epoch * len(t.loader) + t.consumed == 4  # 2 steps × 2 micro-batches


# Accumulation / DDP equivalence runs: dropout off (the masks are drawn per micro-batch / per rank), no warm-up (a
# full-size lr, so the step is visible), heads and frozen CLIP in float64.
EXACT = CFG.with_(heads=replace(CFG.heads, dropout=0.0),
                  train=replace(TRAIN, warmup_iters=0, checkpoint_every=100))


def float64_step(real, seen: list, pseudo: torch.Tensor | None = None):
    """``training_losses`` on float64 images (the trainer normalises to float32), recording every micro-batch;
    with ``pseudo`` (H, W), every image gets those pseudo-labels."""

    def step(model, images, labels, n_iter, cfg, **kw):
        seen.append(images.detach().clone())
        if pseudo is not None:
            kw["pseudo"] = pseudo.expand(images.shape[0], -1, -1)
        return real(model, images.double(), labels, n_iter, cfg, **kw)

    return step


def trained_heads(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Heads state and the gradients of the last optimiser step (``_step`` zeroes them only before the next)."""
    return {"state": heads_state(trainer),
            "grad": {n: p.grad.detach().clone() for n, p in trainer.heads.named_parameters() if p.grad is not None}}


def test_gradient_accumulation_equals_one_larger_batch(voc, tmp_path, monkeypatch):
    """Batch 2 in one pass vs 2 micro-batches of 1 (train.accumulation=2): the same gradients and the same heads
    after one optimiser step. The losses normalise over the whole batch (L_seg's bg/fg pixel counts, L_div's pair
    counts and the batch mean of R inside P), so the two agree exactly only when those cannot differ between the
    images: every image gets the same fixed pseudo-labels (equal counts) and div_weight = 0 (no R mean coupling).
    Gradients: float64 heads; ``training_losses`` evaluates the losses in float32 (``.float()`` on logits and P),
    but the backward of a sum does not depend on its order and the counts are exact, so they agree to F64_REL
    (measured ≤ 1.5e-15). Heads after the AdamW step: the first step is ``lr·g/(|g| + eps)`` per element, which
    turns gradients that are rounding noise (the attention key bias: exact gradient 0) into noise-sized steps
    (measured 3e-10 of the step), so the step is held to F32_REL of each tensor's step magnitude."""
    import excelseg.train.trainer as train_mod

    pseudo = torch.zeros(32, 32, dtype=torch.uint8)
    pseudo[:, 12:] = 3  # background | class 3
    pseudo[:4] = 255  # and an ignored band
    cfg = EXACT.with_(train=replace(EXACT.train, iterations=1, div_weight=0.0, lvc_switch_iter=-1,
                                    self_affinity_iter=-1))
    runs = {}
    for acc in (1, 2):
        seen = []
        monkeypatch.setattr(train_mod, "training_losses", float64_step(training_losses, seen, pseudo))
        cfg_acc = cfg.with_(train=replace(cfg.train, accumulation=acc))
        trainer = Trainer(tiny_excel(cfg=cfg_acc).double(), cfg_acc, train_ds(voc), tmp_path / f"acc{acc}",
                          log=lambda s: None, progress=False)
        assert trainer.micro_batch == 2 // acc
        init = heads_state(trainer)
        trainer.fit()
        runs[acc] = (trained_heads(trainer), seen, init)
    (one, seen1, init), (two, seen2, _) = runs[1], runs[2]
    # the same two (different) crops: one batch of 2 vs two micro-batches of 1
    assert len(seen1) == 1 and len(seen2) == 2
    assert torch.equal(torch.cat(seen2), seen1[0]) and not torch.equal(seen1[0][0], seen1[0][1])
    trainable = {n for n, p in trainer.heads.named_parameters() if p.requires_grad}
    assert one["grad"].keys() == two["grad"].keys() == trainable
    for name, g in one["grad"].items():
        assert float(g.abs().max()) > 0, name
        assert_rel_close(two["grad"][name], g, F64_REL, f"grad {name}")
    for name, after in one["state"].items():
        if after.is_floating_point() and not torch.equal(after, init[name]):
            assert_rel_close(two["state"][name] - init[name], after - init[name], F32_REL, f"step of {name}")
        else:
            assert torch.equal(two["state"][name], after), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_amp_on_cpu_runs_in_low_precision_and_keeps_the_refinement_in_fp32(amp, voc, tmp_path, monkeypatch):
    """``train.amp=bf16`` / ``fp16`` on the CPU, 2 iterations through the trainer (a static one, then an LVC one with
    P-guided refinement): finite fp32 losses, the frozen pass and the heads in the low precision (hooks on the
    patch embedding and the classifier), the refinement and LVC re-run in fp32 with autocast off, the heads
    changed, and a GradScaler enabled (and in use: its scale set) for fp16 only."""
    torch.set_num_threads(1)  # tiny ops; conftest restores the count after the test
    import excelseg.train.trainer as train_mod

    losses = []

    def recording(*args, **kw):
        res = training_losses(*args, **kw)
        losses.append(res.loss.detach())
        return res

    monkeypatch.setattr(train_mod, "training_losses", recording)
    cfg = CFG.with_(train=replace(TRAIN, amp=amp, iterations=2, warmup_iters=0))
    trainer = make_trainer(voc, tmp_path, cfg=cfg)
    calls = refinement_spy(monkeypatch, trainer.model)
    dtypes = {"embed": set(), "logits": set()}
    hooks = [trainer.model.encoder.visual.conv1.register_forward_hook(lambda m, a, o: dtypes["embed"].add(o.dtype)),
             trainer.heads.decoder.classifier.register_forward_hook(lambda m, a, o: dtypes["logits"].add(o.dtype))]
    init = heads_state(trainer)
    trainer.fit()
    for h in hooks:
        h.remove()
    assert len(losses) == 2 and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses)
    assert dtypes == {"embed": {LOW[amp]}, "logits": {LOW[amp]}}
    assert_refinement_in_fp32(calls, lvc=True)
    after = heads_state(trainer)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(init[k], after[k]) for k in init) >= len(init) - 1  # the key bias: gradient 0
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert trainer.scaler.get_scale() == (2.0 ** 16 if amp == "fp16" else 1.0)  # fp16: scaled, no overflow


# The AMP runs against fp32: heads by autocast vs in fp32 after 2 optimiser steps. The pseudo-labels are fixed (an
# argmax: a flip at a near-tie would change the loss by a step, not by rounding; the refinement's precision is
# checked above), dropout is off, and AdamW's eps is set above every gradient (max ≈ 0.5) with weight decay 0,
# so each update is linear in the gradients (the default eps makes the first step lr·sign(g), which turns rounding
# noise in small gradients into full-size steps). The difference of the updates is then the rounding of the low
# precision format, measured over all heads as ‖Δ_amp − Δ_fp32‖ / ‖Δ_fp32‖: 9.1 u for bf16 (u = 2^-8) and 16.9 u
# for fp16 (u = 2^-11; fp16 loses more in units of u, presumably on the tiny attention probabilities of the
# sharpened tiny ViT, below fp16's normal range), the same at 1 and 2 threads. The bound, 64 u, keeps a ≥ 3.8×
# margin; a skipped step is off by 1 (checked: a doubly scaled fp16 loss overflows and skips both steps).
AMP_UNIT = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
AMP_ROUNDING = 64


def update_rel_err(init, a, b) -> float:
    """‖(a − init) − (b − init)‖ / ‖b − init‖ over every floating heads tensor (float64)."""
    keys = [k for k in init if init[k].is_floating_point()]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    den = sum(float(((b[k].double() - init[k].double()) ** 2).sum()) for k in keys)
    return (num / den) ** 0.5


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_amp_heads_agree_with_fp32_within_the_rounding_of_the_format(amp, voc, tmp_path, monkeypatch):
    """Heads after 2 steps with ``train.amp`` = bf16 / fp16 vs ``off``, within 64 units of rounding of the format
    (the comment above); with fp16 the gradients reaching the heads are those of fp32 × the GradScaler's 2^16
    (the loss is scaled) while the update matches (the step unscales them)."""
    torch.set_num_threads(1)  # tiny ops; conftest restores the count after the test
    import excelseg.train.trainer as train_mod

    pseudo = torch.zeros(32, 32, dtype=torch.uint8)
    pseudo[:, 12:] = 3
    pseudo[20:, :8] = 7
    pseudo[:4] = 255

    def fixed_pseudo(model, images, labels, n_iter, cfg, **kw):
        return training_losses(model, images, labels, n_iter, cfg, pseudo=pseudo.expand(images.shape[0], -1, -1))

    monkeypatch.setattr(train_mod, "training_losses", fixed_pseudo)
    runs = {}
    for mode in ("off", amp):
        cfg = EXACT.with_(train=replace(EXACT.train, amp=mode, iterations=2, self_affinity_iter=-1, eps=10.0,
                                        lr=1e-2, weight_decay=0.0))
        trainer = make_trainer(voc, tmp_path / mode, cfg=cfg)
        raw = []  # the gradient as backward delivers it to the classifier weight, before any unscaling
        trainer.heads.decoder.classifier.weight.register_hook(lambda g, raw=raw: raw.append(g.detach().clone()))
        init = heads_state(trainer)
        trainer.fit()
        runs[mode] = (heads_state(trainer), raw, trainer.scaler.get_scale())
    (ref, raw_ref, _), (got, raw_got, scale) = runs["off"], runs[amp]
    bound = AMP_ROUNDING * AMP_UNIT[amp]
    err = update_rel_err(init, got, ref)
    assert err <= bound, f"{amp}: heads' update off by {err:.3e} of its size > {bound:.3e}"
    assert scale == (2.0 ** 16 if amp == "fp16" else 1.0) and len(raw_got) == len(raw_ref) == 2
    for g, r in zip(raw_got, raw_ref):
        assert_rel_close(g / scale, r, bound, f"{amp} gradient reaching the classifier / scale")


def test_validation_prints_both_tables(voc, tmp_path):
    lines = []
    cfg = CFG.with_(train=replace(TRAIN, iterations=1, val_every=1))
    t = Trainer(tiny_excel(cfg=cfg), cfg, train_ds(voc), tmp_path, val_ds=open_dataset("voc", voc, split="val"),
                log=lines.append, progress=False)
    t.fit()
    table = next(line for line in lines if line.startswith("validation @ iteration 1"))
    assert "pseudo" in table and "seg" in table and "aeroplane" in table and "mIoU" in table


# ---- the command ------------------------------------------------------------------------------------------------


def tiny_yaml(path: Path, **train) -> Path:
    cfg = CFG.with_(train=replace(TRAIN, **train))
    path.write_text(dump_config(cfg))
    return path


def test_cli_unknown_key_lists_the_valid_ones(voc, tmp_path, capsys):
    code = main(["train", "--root", str(voc), "--out-dir", str(tmp_path), "train.bogus=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown setting train.bogus" in err and "lvc_switch_iter" in err and "iterations" in err


def test_cli_end_to_end_train_predict_eval(voc, tmp_path, capsys):
    """excelseg train (a few iterations, validation, checkpoint) → predictions of the trained decoder → excelseg
    eval; then --resume with a changed setting is refused without --force."""
    from excelseg.io.checkpoint import load_heads

    clip = save_tiny(tmp_path / "tiny.pt", **TINY)
    cfg_path = tiny_yaml(tmp_path / "tiny.yaml", iterations=3, val_every=3, checkpoint_every=3)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg_path), "--root", str(voc), "--split", "train", "--clip", str(clip),
            "--out-dir", str(run), "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation @ iteration 3" in out and "crop: label-free random crop" in out
    assert (run / "excelseg_config.yaml").is_file() and (run / "train.log").is_file()
    ck = json.loads((run / "latest.json").read_text())
    _, meta = load_heads(run / ck["heads"])
    assert ck["iteration"] == 3 and meta["iteration"] == "3"

    # segment val with the trained checkpoint (MS + flip), then score with excelseg eval
    pred = tmp_path / "pred"
    assert main(["segment", "--checkpoint", str(run / ck["heads"]), "--dataset", "voc", "--root", str(voc),
                 "--split", "val", "--clip", str(clip), "--out-dir", str(pred), "--device", "cpu", "--no-crf"]) == 0
    val = open_dataset("voc", voc, split="val")
    assert main(["eval", "--pred", str(pred), "--root", str(voc), "--split", "val", "--workers", "1"]) == 0
    result = json.loads((pred / "metrics.json").read_text())
    assert 0.0 <= result["miou"] <= 1.0 and result["evaluated"] == len(val)

    assert main([*args, "--resume", "train.lr=0.5"]) == 2
    assert "config differs" in capsys.readouterr().err


DDP = EXACT.with_(train=replace(EXACT.train, lvc_switch_iter=-1))


def _fork_ranks(worker, *args, timeout: float = 120) -> None:
    """``worker(rank, 2, *args)`` in 2 forked processes (as DataLoader workers are: a spawned child re-imports
    torch and open_clip, ~10 s each); a rank's exception fails the test with its traceback."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(2, *args), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the 2 processes did not finish in {timeout:.0f} s")


def _join_gloo(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))


def _ddp_worker(rank: int, world: int, voc: str, out: str) -> None:
    """One rank of :func:`ddp_ranks` (a forked child): 2 iterations in float64; saves its heads and gradients
    (``rankR.pt``), the image ids it read (``TrainSet.__getitem__`` wrapped) and the ids its trainer's sampler
    gives for epochs 0 and 1 (``rankR.json``)."""
    import excelseg.train.trainer as train_mod
    from excelseg.train import DistInfo
    from excelseg.train.data import TrainSet

    read: list[str] = []
    real = TrainSet.__getitem__

    def recording(self, i):
        read.append(self.base.ids[self.indices[i]])
        return real(self, i)

    TrainSet.__getitem__ = recording  # this forked process only
    _join_gloo(rank, world, out)
    try:
        train_mod.training_losses = float64_step(training_losses, [])
        trainer = Trainer(tiny_excel(cfg=DDP).double(), DDP, train_ds(voc), Path(out) / "run",
                          dist=DistInfo(rank, world, rank), log=lambda s: None, progress=False)
        trainer.fit(2)
        torch.save(trained_heads(trainer), Path(out) / f"rank{rank}.pt")
        orders = []
        for epoch in (0, 1):
            trainer.sampler.set_epoch(epoch)
            orders.append([trainer.train_set.base.ids[trainer.train_set.indices[i]] for i in trainer.sampler])
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"read": read, "orders": orders}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(voc, tmp_path_factory) -> list[dict]:
    """2 gloo processes × 1 image, 2 iterations (:func:`_ddp_worker`): per rank "state", "grad", "read", "orders"."""
    out = tmp_path_factory.mktemp("ddp")
    _fork_ranks(_ddp_worker, str(voc), str(out))
    return [{**torch.load(out / f"rank{r}.pt", weights_only=True), **json.loads((out / f"rank{r}.json").read_text())}
            for r in (0, 1)]


def test_ddp_two_processes_average_the_gradients(ddp_ranks, voc, tmp_path, monkeypatch):
    """2 gloo processes with one image each vs one process with both as 2 micro-batches (train.accumulation=2):
    the same gradients and heads after 2 optimiser steps, on both ranks. Each process's loss is that of its own
    micro-batch (per-batch normalisers and R mean), exactly what accumulation computes, so this needs no fixed
    pseudo-labels (computed by each run, L_div weighted 0.1); dropout is off (masks are drawn per rank). Float64:
    the two differ only by how the two float64 gradients are added ((g0 + g1)/2 all-reduced vs g0/2 + g1/2).
    Static CAMs only: the LVC branch cannot run a float64 model (``ExcelModel.forward`` casts the SVC cache to
    float32 when it is not float32, and the calibrated re-run then mixes dtypes)."""
    import excelseg.train.trainer as train_mod

    monkeypatch.setattr(train_mod, "training_losses", float64_step(training_losses, seen := []))
    cfg = DDP.with_(train=replace(DDP.train, accumulation=2))
    single = Trainer(tiny_excel(cfg=cfg).double(), cfg, train_ds(voc), tmp_path / "single", log=lambda s: None,
                     progress=False)
    init = heads_state(single)
    single.fit(2)
    ref = trained_heads(single)
    assert len(seen) == 4 and all(x.shape[0] == 1 for x in seen)
    for rank in ddp_ranks:
        assert rank["grad"].keys() == ref["grad"].keys() and rank["state"].keys() == ref["state"].keys()
        for name, g in ref["grad"].items():
            assert float(g.abs().max()) > 0, name
            assert_rel_close(rank["grad"][name], g, F64_REL, f"grad {name}")
        for name, after in ref["state"].items():
            if after.is_floating_point() and not torch.equal(after, init[name]):
                assert_rel_close(rank["state"][name] - init[name], after - init[name], F32_REL, f"steps of {name}")
            else:
                assert torch.equal(rank["state"][name], after), name


def test_ddp_ranks_read_disjoint_images_in_every_epoch(ddp_ranks, voc):
    """Issue 24 item 2: the processes of a run read different images. Each rank's sampler is the one its
    :class:`Trainer` built (rank, world = 2, the run's seed); the 10 ids split 5 + 5 with nothing in common and
    nothing left out in epochs 0 and 1 (10 is a multiple of 2: ``DistributedSampler`` pads or drops only
    otherwise; epoch 1 is asked of the sampler here, that the trainer reaches ``set_epoch`` is
    tests/test_promises_resume.py), each rank's epoch 1 is another order than its epoch 0, and the images each
    trainer really read in its 2 iterations are the head of its epoch-0 share."""
    ids = sorted(train_ds(voc).ids)
    assert len(ids) == 10
    for rank in ddp_ranks:
        assert rank["read"] == rank["orders"][0][:2]
        assert rank["orders"][0] != rank["orders"][1], "a rank replayed epoch 0's order"
    for epoch in (0, 1):
        a, b = (rank["orders"][epoch] for rank in ddp_ranks)
        assert len(a) == len(set(a)) == len(b) == len(set(b)) == 5
        assert not set(a) & set(b), f"epoch {epoch}: both processes read {sorted(set(a) & set(b))}"
        assert sorted(a + b) == ids


def _full_disk_worker(rank: int, world: int, voc: str, out: str) -> None:
    """One rank of :func:`test_ddp_a_failed_checkpoint_stops_every_rank`: rank 0's disk is full; each rank writes
    what its ``fit`` ended with to ``rankR.txt``."""
    from excelseg.train import DistInfo

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    _join_gloo(rank, world, out)
    try:
        if rank == 0:
            torch.save = full  # this forked process only
        trainer = Trainer(tiny_excel(cfg=DDP), DDP, train_ds(voc), Path(out) / "run", dist=DistInfo(rank, world, rank),
                          log=lambda s: None, progress=False)
        try:
            trainer.fit(2)
            outcome = "finished"
        except TrainingError as exc:
            outcome = str(exc)
        (Path(out) / f"rank{rank}.txt").write_text(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_a_failed_checkpoint_stops_every_rank(voc, tmp_path):
    """Rank 0 cannot write the checkpoint (full disk): both processes stop with a TrainingError saying so (rank 1
    is told by rank 0; before, rank 0 left alone and rank 1 died at the next collective with gloo's "Connection
    closed by peer", or would wait for the NCCL timeout), and no half checkpoint is left."""
    _fork_ranks(_full_disk_worker, str(voc), str(tmp_path), timeout=90)
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    folder = tmp_path / "run" / "checkpoints"
    assert r0 == f"cannot write the checkpoint of iteration 2 to {folder} (No space left on device)"
    assert r1 == f"cannot write the checkpoint of iteration 2 to {folder} (rank 0 could not write it: see its message)"
    assert not list(folder.iterdir()) and not (tmp_path / "run" / "latest.json").exists()


def test_torchrun_two_processes_gloo(voc, tmp_path):
    """``excelseg train`` under torchrun, 2 CPU processes (gloo): the run starts, reports its split of the batch and
    rank 0 writes one checkpoint (that DDP averages the gradients: the test above)."""
    clip = save_tiny(tmp_path / "tiny.pt", **TINY)
    cfg_path = tiny_yaml(tmp_path / "tiny.yaml", iterations=2, checkpoint_every=2, val_every=0)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), env_path()]), "OMP_NUM_THREADS": "1",
           "EXCELSEG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "excelseg.cli", "train", "--config", str(cfg_path), "--root", str(voc), "--split", "train", "--clip",
           str(clip), "--out-dir", str(run), "--workers", "0", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 2 = 2 process(es) × 1 accumulation × 1" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000002.safetensors",
                                                                        "iter_000002.state.pt"]


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")
