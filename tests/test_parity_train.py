"""Five reference optimiser steps (parity README §4.6 ``train_steps.npz``, ``heads_after_steps.safetensors``)
reproduced with excelseg's training step (:func:`excelseg.train.step.training_losses`) and optimiser
(:mod:`excelseg.train.optim`), checked with the rules of README §6.1 as stated there:

* per step: group lrs (rel 1e-6), losses (rel 1e-4), ``R_mean`` (2e-6), pseudo-labels / ``seg_pred_step4``
  (≤ 0.1 % of pixels per image), ``pos/neg_count`` (exact, with the README's margin for sampled pixels whose
  label moved: up to 2·17·17 pairs each), ``segs`` (5e-4), ``cam_lvc`` (≤ 2e-4 except in ≤ 2 % of the token rows
  per image, each explained by a flipped R′ ≈ 0 mask entry: :func:`parity_rules.resolve_lvc_flips`);
* then the norms, in float64: ``grad_norm`` (element-wise rel 5e-4), ``grad.<name>`` (rel 5e-4 of max|ref|),
  ``value_norm`` (rel 3e-7; the 12 zero-init tensors abs 2e-8), ``value.<name>`` (abs 5e-7);
* the final state: ≥ 99.9 % of the 6,313,237 elements within 1e-6, ≥ 99 % within 1e-7, all within
  2.02·Σ ``lr_heads``.

The frozen CLIP pass of the fixed batch is computed once (the same input every step) and reused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_kit import GOLDEN, PARITY, REF_BANK, random_clip_weights, require_kit
from parity_rules import resolve_lvc_flips

# README §6.1 "recommended" column
TOL_LR_REL = 1e-6
TOL_LOSS_REL = 1e-4
TOL_R_MEAN = 2e-6
TOL_LABEL_FRAC = 1e-3
TOL_SEGS = 5e-4
TOL_CAM = 2e-4  # cam_static (steps 0–2); cam_lvc: parity_rules.resolve_lvc_flips
TOL_GRAD_REL = 5e-4
TOL_VALUE_NORM_REL, TOL_VALUE_NORM_ZERO = 3e-7, 2e-8
TOL_VALUE = 5e-7
FINAL_RULES = ((1e-6, 0.999), (1e-7, 0.99))
BOUND_FACTOR = 2.02  # × Σ lr_heads (Adam's |m̂|/√v̂ ≤ 1.011 per step, two runs)
SAMPLED_PAIRS = 2 * 17 * 17  # pairs one moved sampled pixel can change (both directions)

# under pytest-xdist (`make test`), this module's tests share the two trajectories: keep them on one worker
pytestmark = pytest.mark.xdist_group("parity_train")


def _rel(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.fixture(scope="module")
def setup():
    """Model with the reference heads' initial state, the batch and the goldens (the frozen pass runs once)."""
    require_kit()
    from excelseg import CamPredictor, load_clip
    from excelseg.config import PAPER_VOC
    from excelseg.heads import ExcelHeads
    from excelseg.interop import import_reference_heads
    from excelseg.io.images import read_image, to_rgb_array
    from excelseg.model import ExcelModel
    from excelseg.preprocess import network_input
    from parity_kit import image_path

    g = dict(np.load(GOLDEN / "train_steps.npz"))
    clip = load_clip(random_clip_weights(), device="cpu")
    predictor = CamPredictor(clip, vocabulary="voc", bank=REF_BANK, config=PAPER_VOC, device="cpu")
    init = import_reference_heads(PARITY / "ref_heads_seed0.safetensors", num_classes=20)
    model = ExcelModel(clip.model.visual, predictor.text_features(predictor.vocabulary), 20, PAPER_VOC,
                       ExcelHeads(21))
    model.eval()  # README §4.6: eval mode with gradients (adapter dropout off)

    # the same input every step → one frozen pass, reused
    real_forward, memo = model.encoder.forward, {}

    def cached(images, *a, **kw):
        if "out" not in memo:
            memo["out"] = real_forward(images, *a, **kw)
        return memo["out"]

    model.encoder.forward = cached
    x = torch.stack([network_input(to_rgb_array(read_image(image_path(str(n)))), (320, 320), "imagenet")
                     for n in g["names"]])
    return g, model, init, x, torch.from_numpy(g["cls_labels"])


def _trajectory(setup, golden_labels: bool):
    """The five steps from the initial heads, recorded per step; ``golden_labels``: L_seg / L_div targets from
    the golden pseudo-labels (README §6.1: isolates optimiser and losses from label noise)."""
    from safetensors.torch import load_file

    from excelseg.config import PAPER_VOC
    from excelseg.heads import reference_key_map
    from excelseg.lvc import relation_logits
    from excelseg.train.optim import build_optimizer, set_lrs
    from excelseg.train.step import training_losses

    g, model, init, x, cls = setup
    heads = model.heads
    heads.load_state_dict(init)
    cfg, cfg_heads = PAPER_VOC.train, PAPER_VOC.heads
    opt = build_optimizer(heads, cfg)
    ref_to_ours = reference_key_map()
    params = dict(heads.named_parameters())
    ordered = [params[ref_to_ours[str(n)]] for n in g["param_names"]]
    pseudo_at = {int(s): i for i, s in enumerate(g["pseudo_steps"])}
    steps = []
    for k, n_iter in enumerate(g["n_iter"].tolist()):
        set_lrs(opt, k, cfg)
        given = torch.from_numpy(g["pseudo"][pseudo_at.get(k, 0)]) if golden_labels else None
        res = training_losses(model, x, cls, int(n_iter), cfg, pseudo=given)
        opt.zero_grad()
        res.loss.backward()
        rec = {
            "lr": [grp["lr"] for grp in opt.param_groups],
            "loss_seg": float(res.loss_seg.detach()), "loss_div": float(res.loss_div.detach()),
            "loss_total": float(res.loss.detach()),
            "pos": int(res.pos_count), "neg": int(res.neg_count), "R_mean": float(res.output.relation_mean),
            "segs": res.output.seg_logits.detach().clone(), "pseudo": res.pseudo.clone(),
            "source": res.aff_source.clone(), "cams": res.cams.clone(),
            "relation_logits": relation_logits(res.output.adapter_fts.detach(), cfg_heads.relation_gain),
            "cache": res.output.cache, "grid": res.output.grid,  # the memoised frozen pass: no copy
            "grad_norm": [float(torch.linalg.vector_norm(p.grad.double())) for p in ordered],
            "grad": {n: params[ref_to_ours[n]].grad.detach().clone() for n in _small_names(g)},
        }
        opt.step()
        rec["value_norm"] = [float(torch.linalg.vector_norm(p.detach().double())) for p in ordered]
        rec["value"] = {n: params[ref_to_ours[n]].detach().clone() for n in _small_names(g)}
        steps.append(rec)
    final_ref = load_file(str(GOLDEN / "heads_after_steps.safetensors"))
    final = {n: params[ref_to_ours[n]].detach().clone() for n in final_ref}
    return g, steps, final, final_ref


@pytest.fixture(scope="module")
def run(setup):
    """Our own trajectory: CAMs, pseudo-labels and affinity targets computed by excelseg."""
    return _trajectory(setup, golden_labels=False)


@pytest.fixture(scope="module")
def run_golden_labels(setup):
    return _trajectory(setup, golden_labels=True)


def _small_names(g) -> list[str]:
    return [k[len("value."):] for k in g if k.startswith("value.") and k != "value_norm"]


def _moved_sampled(ours: torch.Tensor, ref: np.ndarray) -> int:
    """Sampled pixels (top-left of each 16×16 cell) whose label differs from the golden one."""
    return int((ours[:, ::16, ::16].numpy() != ref[:, ::16, ::16]).sum())


def _check_labels(ours: torch.Tensor, ref: np.ndarray, what: str) -> None:
    for b in range(ref.shape[0]):
        frac = float((ours[b].numpy() != ref[b]).mean())
        assert frac <= TOL_LABEL_FRAC, f"{what}[{b}]: {frac:.3%} of pixels differ"


def test_steps_losses_counts_labels(run):
    g, steps, _, _ = run
    pseudo_at = {int(s): i for i, s in enumerate(g["pseudo_steps"])}
    for k, rec in enumerate(steps):
        for grp in range(4):
            assert _rel(rec["lr"][grp], g["lr"][k, grp]) <= TOL_LR_REL, (k, grp, rec["lr"][grp], g["lr"][k, grp])
        assert _rel(rec["lr"][3], g["lr_heads"][k]) <= TOL_LR_REL
        if k in pseudo_at:
            _check_labels(rec["pseudo"], g["pseudo"][pseudo_at[k]], f"pseudo step {k}")
        else:  # steps 1, 2: the static pseudo labels of step 0 (README §4.6 checks)
            _check_labels(rec["pseudo"], g["pseudo"][0], f"pseudo step {k}")
        source_ref = g["seg_pred_step4"] if k == 4 else (g["pseudo"][pseudo_at.get(k, 0)])
        if k == 4:
            _check_labels(rec["source"], source_ref, "seg_pred_step4")
        moved = _moved_sampled(rec["source"], source_ref)
        for key, ref in (("pos", g["pos_count"][k]), ("neg", g["neg_count"][k])):
            assert abs(rec[key] - int(ref)) <= SAMPLED_PAIRS * moved, (k, key, rec[key], int(ref), moved)
        for key in ("loss_seg", "loss_div", "loss_total"):
            assert _rel(rec[key], g[key][k]) <= TOL_LOSS_REL, (k, key, rec[key], float(g[key][k]))
        assert abs(rec["R_mean"] - float(g["R_mean"][k])) <= TOL_R_MEAN
        err = float((rec["segs"].double() - torch.from_numpy(g["segs"][k]).double()).abs().max())
        assert err <= TOL_SEGS, (k, err)


def test_golden_labels_losses_counts(run_golden_labels):
    """On the golden pseudo-labels the counts are exact and the losses within rel 1e-4 at every step."""
    g, steps, _, _ = run_golden_labels
    for k, rec in enumerate(steps):
        if k == 4:
            _check_labels(rec["source"], g["seg_pred_step4"], "golden labels: seg_pred_step4")
        moved = _moved_sampled(rec["source"], g["seg_pred_step4"]) if k == 4 else 0
        for key, ref in (("pos", g["pos_count"][k]), ("neg", g["neg_count"][k])):
            assert abs(rec[key] - int(ref)) <= SAMPLED_PAIRS * moved, (k, key, rec[key], int(ref))
        for key in ("loss_seg", "loss_div", "loss_total"):
            assert _rel(rec[key], g[key][k]) <= TOL_LOSS_REL, (k, key, rec[key], float(g[key][k]))


def test_lvc_cams(setup, run):
    """Steps 3–4 use LVC CAMs from that step's adapter features (README §6.1 ``cam_lvc``): every token row within
    2e-4, except rows explained by an R′ ≈ 0 entry whose −∞ mask flipped (our heads after step 2 differ from the
    reference's by float noise and the few pseudo-label pixels that differ, so R′ near 0 may change sign — seen
    at step 4 with AVX2 kernels, rows off by 6.1e-2); steps 0–2 use the static CAMs of ``batch4``."""
    from excelseg.lvc import shift_from_logits

    model = setup[1]
    g, steps, _, _ = run
    for i, k in enumerate((3, 4)):
        rec = steps[k]
        ours = rec["cams"].flatten(2).transpose(1, 2).double().numpy()  # (4, 400, 20)
        for b in range(ours.shape[0]):
            cache_b = rec["cache"].select(slice(b, b + 1))

            def cams_fn(lg, cache_b=cache_b, grid=rec["grid"]):
                with torch.no_grad():
                    feats, _ = model.encoder.calibrate(cache_b, shift_from_logits(lg))
                    cams = model.cams_from_features(feats, grid)[0]
                return cams.flatten(1).T.double().numpy()

            logits = rec["relation_logits"][b:b + 1]
            # the function checked is the one training used: same logits, same CAMs (batch 4 vs 1: kernel noise)
            assert np.abs(cams_fn(logits) - ours[b]).max() <= 1e-5
            resolve_lvc_flips(cams_fn, logits, g["cam_lvc"][i][b], [lambda r: r], f"cam_lvc step {k}")
    # steps 0–2 use the static CAMs of batch4
    static = np.load(GOLDEN / "batch4.npz")["cam_static"]
    for k in range(3):
        err = np.abs(steps[k]["cams"].flatten(2).transpose(1, 2).double().numpy() - static).max()
        assert err <= TOL_CAM, (k, err)


def test_norms_on_golden_labels(run_golden_labels):
    """Every norm rule of README §6.1 on the trajectory whose targets are the golden pseudo-labels."""
    _check_norms(run_golden_labels, zero_init_rule=True)


def test_norms(run):
    """Our own trajectory (labels within 0.1 % of the golden ones): the gradient and norm rules, but not the
    absolute rules on the values: the zero-init tensors' norms (2e-8) and ``value.<name>`` (5e-7) move with the
    few pseudo-label pixels that differ (measured 4.2e-8 and 7.1e-7 with AVX2 kernels; README §6.1: recompute on
    the golden pseudo-labels — test above). Values are held to §6.1's hard bound for any two correct runs,
    2.02·Σ lr_heads up to that step."""
    _check_norms(run, zero_init_rule=False)


def _check_norms(run, zero_init_rule: bool):
    g, steps, _, _ = run
    zero_init = g["value_norm_init"] == 0
    assert int(zero_init.sum()) == 12
    for k, rec in enumerate(steps):
        gn = np.asarray(rec["grad_norm"])
        rel = np.abs(gn - g["grad_norm"][k]) / np.abs(g["grad_norm"][k])
        assert rel.max() <= TOL_GRAD_REL, (k, str(g["param_names"][rel.argmax()]), rel.max())
        vn = np.asarray(rec["value_norm"])
        rel_v = np.abs(vn - g["value_norm"][k])[~zero_init] / g["value_norm"][k][~zero_init]
        assert rel_v.max() <= TOL_VALUE_NORM_REL, (k, rel_v.max())
        abs_z = np.abs(vn - g["value_norm"][k])[zero_init]
        if zero_init_rule:
            assert abs_z.max() <= TOL_VALUE_NORM_ZERO, (k, abs_z.max())
        for name, t in rec["grad"].items():
            ref = g["grad." + name][k]
            rel_g = float(np.abs(t.double().numpy() - ref).max() / np.abs(ref).max())
            assert rel_g <= TOL_GRAD_REL, (k, name, rel_g)
        value_tol = TOL_VALUE if zero_init_rule else BOUND_FACTOR * float(g["lr_heads"][: k + 1].sum())
        for name, t in rec["value"].items():
            err = float(np.abs(t.double().numpy() - g["value." + name][k]).max())
            assert err <= value_tol, (k, name, err)


@pytest.mark.parametrize("which", ["own labels", "golden labels"])
def test_final_state(which, request):
    g, _, final, final_ref = request.getfixturevalue("run" if which == "own labels" else "run_golden_labels")
    diffs = torch.cat([(final[n].double() - final_ref[n].double()).abs().flatten() for n in final_ref])
    assert diffs.numel() == 6_313_237
    for tol, frac in FINAL_RULES:
        within = float((diffs <= tol).double().mean())
        assert within >= frac, (tol, within)
    bound = BOUND_FACTOR * float(g["lr_heads"].sum())
    assert float(diffs.max()) <= bound
