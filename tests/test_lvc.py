"""LVC maths (R, P, E, P-guided affinity), the two-stage SVC (cache + shifted dual path), the adapter-input
aliasing switch, the losses and ExcelModel — tiny random CLIPs, checked against literal re-statements of
EXCEL_SPEC §4.2, §5.2, §10.1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from excelseg.backbone import DenseEncoder, interpolate_pos_embed
from excelseg.config import PAPER_VOC, CamConfig, HeadsConfig, RefineConfig
from excelseg.losses import affinity_labels, affinity_loss, balanced_seg_loss, excel_loss, radius_mask
from excelseg.lvc import learned_affinity, lvc_shift, p_guided_affinity, relation, relation_logits
from excelseg.model import ExcelModel
from excelseg.preprocess import denormalize_uint8
from excelseg.refine import flip_max_cams
from numerics import F32_REL, F64_REL, assert_rel_close, rel_err
from tiny_clip import tiny_model


def _feats(seed: int, b: int = 2, c: int = 6, h: int = 3, w: int = 4) -> torch.Tensor:
    # float64: the formulas are compared with F64_REL (numerics.py), far below any formula difference
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- relation, P, E (§4.2) ---------------------------------------------------------------------------------------
def test_relation_is_pairwise_cosine():
    f = _feats(0)
    tok = f.flatten(2).transpose(1, 2)  # (B, N, C)
    expected = F.cosine_similarity(tok[:, :, None, :], tok[:, None, :, :], dim=-1)
    assert_rel_close(relation(f), expected, F64_REL, "R")


def test_p_mean_is_batch_coupled_and_differentiable():
    f = _feats(1).requires_grad_(True)
    p = learned_affinity(f)
    r = relation(f.detach())
    assert_rel_close(p.detach(), torch.sigmoid(3 * (r - r.mean())), F64_REL, "P")
    alone = learned_affinity(f.detach()[:1])
    assert rel_err(p.detach()[:1], alone) > 1e-3  # another image changes image 0's P
    p.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_lvc_shift_masks_negative_logits_and_has_no_gradient():
    f = _feats(2).requires_grad_(True)
    e = lvc_shift(f)
    r = relation(f.detach())
    logits = 3 * (r - r.mean())  # one mean over the whole batch (EXCEL_SPEC §10.8)
    assert_rel_close(relation_logits(f.detach()), logits, F64_REL, "R'")
    assert not e.requires_grad
    assert torch.all(e[logits < 0] == 0)
    assert torch.all(e[logits >= 0] > 0)
    assert_rel_close(e.sum(-1), torch.ones(e.shape[:2]), F64_REL, "row sums of E")
    kept = torch.where(logits >= 0, logits.exp(), torch.zeros((), dtype=logits.dtype))
    assert_rel_close(e, kept / kept.sum(-1, keepdim=True), F64_REL, "E")


def test_p_guided_affinity_selects_layers_with_large_patch_mass():
    n = 4
    p = torch.full((1, n, n), 0.5)
    mass = torch.tensor([1.0, 3.0, 2.0, 4.0])  # each layer a constant map; Σ A_l = 16 · mass
    maps = mass.view(1, 4, 1, 1).expand(1, 4, n, n).clone()
    aff, diff, kept = p_guided_affinity(maps, p)
    assert torch.equal(diff[0], 16 * (0.5 - mass))  # small binary fractions: exact
    # d_l ≤ mean(d) ⟺ mass_l ≥ mean(mass) = 2.5 → layers 1 and 3
    assert kept[0].tolist() == [False, True, False, True]
    assert torch.equal(aff, torch.full((1, n, n), (3.0 + 4.0) / 2 * 0.5))


# ---- two-stage SVC with the LVC shift (§3.1, §4.2) ---------------------------------------------------------------
def naive_shifted_svc(visual, x, first_svc: int, shift: torch.Tensor | None):
    """Literal per-head dual path: every head's map gets E added on its patch×patch block before the head sum."""
    grid = (x.shape[-2] // visual.patch_size[0], x.shape[-1] // visual.patch_size[1])
    pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid)
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = visual.ln_pre(torch.cat([visual.class_embedding.expand(h.shape[0], 1, -1), h], 1) + pos)
    new = None
    for i, block in enumerate(visual.transformer.resblocks):
        if i >= first_svc:
            new = h.clone() if new is None else new
            q, k, v = F.linear(block.ln_1(h), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)
            nh = block.attn.num_heads
            dh = q.shape[-1] // nh
            a_sum = 0
            for hd in range(nh):
                sl = slice(hd * dh, (hd + 1) * dh)
                a = sum(torch.softmax(z[..., sl] @ z[..., sl].transpose(1, 2) / dh ** 0.5, -1) for z in (q, k, v)) / 3
                if shift is not None:
                    a = a.clone()
                    a[:, 1:, 1:] += shift
                a_sum = a_sum + a
            out = torch.cat([a_sum @ v[..., hd * dh:(hd + 1) * dh] for hd in range(nh)], -1)
            new = new + block.attn.out_proj(out)
        h = block(h)
    new = torch.cat([h[:, :1], new[:, 1:]], 1)
    return visual.ln_post(new) @ visual.proj


@torch.no_grad()
def test_calibrate_from_cache_equals_forward_and_literal_shifted_path():
    model = tiny_model(3, layers=4, image=32, patch=8, heads=2).double()
    enc = DenseEncoder(model.visual)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = enc(x, (2, 3), keep_cache=True)
    static, stream = enc.calibrate(out.cache)
    assert torch.equal(static, out.features) and torch.equal(stream, out.svc_stream)

    n = out.features.shape[1] - 1
    e = torch.softmax(torch.randn(2, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3, -1)
    shifted, _ = enc.calibrate(out.cache, e)
    expected = naive_shifted_svc(model.visual, x, 2, e)
    assert_rel_close(shifted, expected, F64_REL, "shifted SVC")
    # float32 (what the pipeline runs), same weights: within float32 rounding of the float64 oracle
    enc32 = DenseEncoder(tiny_model(3, layers=4, image=32, patch=8, heads=2).visual)
    shifted32, _ = enc32.calibrate(enc32(x.float(), (2, 3), keep_cache=True).cache, e.float())
    assert shifted32.dtype == torch.float32
    assert_rel_close(shifted32, expected, F32_REL, "float32 shifted SVC")
    assert rel_err(shifted, static) > 1e-2  # the shift matters
    assert torch.equal(shifted[:, 0], static[:, 0])  # CLS comes from the original stream
    # per-image slices of the cache give the same dual path
    one, _ = enc.calibrate(out.cache.select(slice(1, 2)), e[1:])
    assert_rel_close(one, shifted[1:], F64_REL, "per-image cache slice")
    with pytest.raises(ValueError, match="shift must be"):
        enc.calibrate(out.cache, e[:, :-1])


@torch.no_grad()
def test_head_mean_variant_adds_the_shift_once():
    model = tiny_model(4, layers=3, image=32, patch=8, heads=2)
    enc = DenseEncoder(model.visual)
    out = enc(torch.randn(1, 3, 32, 32), (2,), head_sum=False, keep_cache=True)
    assert out.cache.shift_scale == 1.0
    assert enc(torch.randn(1, 3, 32, 32), (2,), keep_cache=True).cache.shift_scale == 2.0


@torch.no_grad()
def test_aliased_adapter_tokens_follow_the_reference_layout():
    """§10.1: slot (first SVC − 1) = final calibrated stream; slots of calibrated blocks but the last =
    x_l + attn_{l+1}(ln_1 x_l) computed here with open_clip's own attention module; all others clean."""
    model = tiny_model(5, layers=5, image=32, patch=8, heads=2).double()
    enc = DenseEncoder(model.visual)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    svc = (2, 3, 4)
    clean = enc(x, svc)
    alias = enc(x, svc, alias_tokens=True)
    blocks = model.visual.transformer.resblocks
    assert torch.equal(alias.tokens[1], alias.svc_stream)
    for layer in (2, 3):
        nxt = blocks[layer + 1]
        y = nxt.ln_1(clean.tokens[layer])
        expected = clean.tokens[layer] + nxt.ls_1(nxt.attn(y, y, y, need_weights=False)[0])
        assert_rel_close(alias.tokens[layer], expected, F64_REL, f"aliased slot {layer}")
    for layer in (0, 4):
        assert torch.equal(alias.tokens[layer], clean.tokens[layer])
    lt = alias.layer_tokens()
    assert lt.shape == (2, 5, 64, 4, 4)
    assert torch.equal(lt[:, 3, :, 1, 2], alias.tokens[3][:, 1 + 1 * 4 + 2])  # row-major grid


# ---- losses (§5.2) -----------------------------------------------------------------------------------------------
def test_balanced_seg_loss_literal():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 6, 6), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 2, 2] = 0
    up = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    bg, fg = [], []
    for b in range(2):
        for i in range(6):
            for j in range(6):
                y = int(labels[b, i, j])
                if y == 255:
                    continue
                (bg if y == 0 else fg).append(-float(logp[b, y, i, j]))
    expected = 0.5 * (sum(bg) / (len(bg) + 1e-6) + sum(fg) / (len(fg) + 1e-6))
    assert_rel_close(balanced_seg_loss(logits, labels), expected, F64_REL, "L_seg")


def test_radius_mask_count_from_the_spec():
    assert int(radius_mask((20, 20), 8).sum()) == 71_824  # EXCEL_SPEC §5.2
    assert bool(radius_mask((20, 20), 8).diagonal().all())


def test_affinity_labels_literal():
    labels = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 255, 3], [0, 0, 3, 3]]).repeat_interleave(2, 0)
    labels = labels.repeat_interleave(2, 1)[None]  # (1, 8, 8): each cell 2×2, top-left pixel = the cell value
    labels[0, 1, 1] = 7  # not a top-left pixel: never sampled
    aff = affinity_labels(labels, (4, 4), radius=1)
    cells = labels[0, ::2, ::2].flatten()
    for i in range(16):
        for j in range(16):
            far = max(abs(i // 4 - j // 4), abs(i % 4 - j % 4)) > 1
            if far or cells[i] == 255 or cells[j] == 255:
                want = 255
            else:
                want = int(cells[i] == cells[j])
            assert int(aff[0, i, j]) == want, (i, j)


def test_affinity_loss_and_total_literal():
    p = torch.tensor([[[0.9, 0.2, 0.6], [0.3, 0.8, 0.1], [0.5, 0.4, 0.7]]], dtype=torch.float64)
    lab = torch.tensor([[[1, 0, 255], [0, 1, 1], [255, 1, 1]]], dtype=torch.uint8)
    res = affinity_loss(p, lab)
    pos = [0.9, 0.8, 0.1, 0.4, 0.7]
    neg = [0.2, 0.3]
    want = 0.5 * sum(1 - v for v in pos) / (len(pos) + 1) + 0.5 * sum(neg) / (len(neg) + 1)
    assert_rel_close(res.loss, want, F64_REL, "L_div")
    assert (int(res.pos_count), int(res.neg_count)) == (6, 3)
    assert float(excel_loss(torch.tensor(2.0), torch.tensor(0.5))) == pytest.approx(2.05)


# ---- ExcelModel --------------------------------------------------------------------------------------------------
def tiny_excel(seed: int = 0) -> ExcelModel:
    clip = tiny_model(seed, layers=4, image=32, patch=8, heads=2, width=64, embed=32)
    cfg = PAPER_VOC.with_(cam=replace(CamConfig(), size=(32, 32), svc_last_blocks=2),
                          refine=replace(RefineConfig(), affinity_layers=3),
                          heads=HeadsConfig(dim=16, decoder_heads=2))
    text = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return ExcelModel(clip.visual, text, 3, cfg)


def test_excel_model_outputs_gradients_and_state_dict():
    model = tiny_excel().train()
    assert not model.encoder.training
    calls = []
    model.encoder.visual.conv1.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = model(x)
    assert out.adapter_fts.shape == (2, 16, 4, 4) and out.seg_logits.shape == (2, 4, 4, 4)
    assert out.affinity.shape == (2, 16, 16) and out.attn.shape == (2, 3, 16, 16)
    assert out.features.shape == (2, 17, 32) and not out.features.requires_grad

    cams = model.lvc_cams(out)
    assert cams.shape == (2, 3, 4, 4) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    assert rel_err(cams, model.static_cams(out)) > 1e-3
    assert len(calls) == 1  # one frozen CLIP pass: LVC CAMs re-run only the calibrated stream

    labels = torch.randint(0, 4, (2, 32, 32))
    loss = balanced_seg_loss(out.seg_logits, labels) + affinity_loss(out.affinity, affinity_labels(labels, (4, 4))).loss
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())

    sd = model.trainable_state_dict()
    assert set(sd) == set(model.heads.state_dict()) and not any(k.startswith("encoder") for k in sd)
    other = tiny_excel(1)
    other.load_trainable_state_dict(sd)
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in sd.items())


@torch.no_grad()
def test_excel_model_pseudo_labels_use_present_classes():
    model = tiny_excel().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = model(x)
    cls = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for guided in (False, True):
        trans, diff, _ = model.transition(out, guided)
        assert trans.shape == (2, 16, 16)
        assert (diff is None) == (not guided)
        labels = model.pseudo_labels(model.static_cams(out), cls, trans, denormalize_uint8(x), (32, 32))
        assert labels.shape == (2, 32, 32) and labels.dtype == torch.uint8
        assert set(labels[0].unique().tolist()) <= {0, 1, 3}
        assert set(labels[1].unique().tolist()) <= {0, 2}


def test_flip_max_cams_and_denormalize():
    a = torch.rand(1, 2, 3, 4, dtype=torch.float64)
    b = torch.rand(1, 2, 3, 4, dtype=torch.float64)
    m = torch.maximum(a, b.flip(-1))
    m = m - m.amin(dim=(-2, -1), keepdim=True)
    assert_rel_close(flip_max_cams(a, b), m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-5), F64_REL, "flip-max")
    x = (torch.tensor([10.4, 20.9, 255.0]).view(1, 3, 1, 1) - torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
         ) / torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert torch.equal(denormalize_uint8(x).flatten(), torch.tensor([10.0, 20.0, 255.0]) / 255)  # uint8 steps
