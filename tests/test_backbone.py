"""Dense forward + SVC against an independent, literal implementation of EXCEL_SPEC §1.1 / §3.1.

Equivalence checks run both sides in float64 (tolerance ``numerics.F64_REL``): kernel and summation-order
differences between CPUs are then ~1e-15, so the checks hold on any machine and still fail for a wrong formula.
The float32 path is checked once against the float64 oracle with a magnitude-scaled bound (``numerics.F32_REL``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from excelseg import _native as native
from excelseg.backbone import DenseEncoder, interpolate_pos_embed
from numerics import F32_REL, F64_REL, assert_rel_close, rel_err
from tiny_clip import tiny_model


def _randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_svc_features(visual, x, first_svc: int):
    """Literal per-head version of the reference's dual path (loops over heads; open_clip's own blocks)."""
    grid = (x.shape[-2] // visual.patch_size[0], x.shape[-1] // visual.patch_size[1])
    pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid)
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([visual.class_embedding.expand(h.shape[0], 1, -1), h], 1) + pos
    h = visual.ln_pre(h)
    new = None
    for i, block in enumerate(visual.transformer.resblocks):
        if i >= first_svc:
            if new is None:
                new = h.clone()
            y = block.ln_1(h)
            qkv = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, v = qkv.chunk(3, dim=-1)
            nh = block.attn.num_heads
            dh = q.shape[-1] // nh
            a_sum = 0
            for hd in range(nh):
                sl = slice(hd * dh, (hd + 1) * dh)
                maps = [torch.softmax(z[..., sl] @ z[..., sl].transpose(1, 2) / dh ** 0.5, -1) for z in (q, k, v)]
                a_sum = a_sum + (maps[0] + maps[1] + maps[2]) / 3
            out = torch.cat([a_sum @ v[..., hd * dh:(hd + 1) * dh] for hd in range(nh)], -1)
            new = new + block.attn.out_proj(out)
        h = block(h)
    if new is None:
        new = h
    new = torch.cat([h[:, :1], new[:, 1:]], 1)
    return visual.ln_post(new) @ visual.proj


@pytest.fixture(scope="module")
def model32():
    return tiny_model(0, layers=4)


@pytest.fixture(scope="module")
def model(model32):
    """The same tiny CLIP in float64: the oracle precision of this module's equivalence checks."""
    return copy.deepcopy(model32).double()


def _open_clip_tokens(model, x):
    ref = model.visual.forward_intermediates(x, indices=4, output_fmt="NLC", output_extra_tokens=True)
    return [torch.cat([cls, patch], 1)
            for patch, cls in zip(ref["image_intermediates"], ref["image_intermediates_prefix"])]


def test_original_path_equals_open_clip(model):
    enc = DenseEncoder(model.visual)
    x = _randn(2, 3, 32, 32, seed=10)
    out = enc(x, svc_blocks=enc.last_blocks(2), attn_blocks=(1, 3))
    assert_rel_close(out.pooled, model.encode_image(x), F64_REL, "pooled")
    for layer, expected in enumerate(_open_clip_tokens(model, x)):
        assert_rel_close(out.tokens[layer], expected, F64_REL, f"tokens[{layer}]")


@pytest.mark.parametrize("maps", ["native", "torch"])
def test_float32_forward_is_within_float32_rounding_of_the_float64_oracle(model32, model, maps, monkeypatch):
    """Same weights in float32 vs float64: bounded relative to each output's magnitude, and no worse than 4×
    open_clip's own float32 error (what any float32 CLIP implementation incurs on this CPU). The SVC and attention
    maps of the float32 forward come from the native kernels (``_native/attention.c``) or, with
    ``EXCELSEG_NATIVE=0``, from torch ops: both must hold."""
    if maps == "torch":
        monkeypatch.setenv("EXCELSEG_NATIVE", "0")
    elif native.attention_library() is None:
        pytest.skip("the native attention kernels could not be built here")
    x = _randn(2, 3, 32, 32, seed=11)
    enc32, enc64 = DenseEncoder(model32.visual), DenseEncoder(model.visual)
    out32 = enc32(x.float(), svc_blocks=enc32.last_blocks(2), attn_blocks=(1, 3))
    out64 = enc64(x, svc_blocks=enc64.last_blocks(2), attn_blocks=(1, 3))
    ours = rel_err(out32.pooled, out64.pooled)
    theirs = rel_err(model32.encode_image(x.float()), out64.pooled)
    assert ours <= max(F32_REL, 4 * theirs), (ours, theirs)
    for name in ("features", "svc_stream", "attn"):
        assert_rel_close(getattr(out32, name), getattr(out64, name), F32_REL, name)
    oc_tokens = _open_clip_tokens(model32, x.float())
    for layer, (a, b) in enumerate(zip(out32.tokens, out64.tokens)):
        assert_rel_close(a, b, F32_REL, f"tokens[{layer}]")
        assert rel_err(a, b) <= max(1e-6, 4 * rel_err(oc_tokens[layer], b)), f"tokens[{layer}] vs open_clip fp32"


@pytest.mark.parametrize("n_svc", [0, 1, 2, 4])
def test_exactly_the_last_blocks_are_calibrated(model, n_svc):
    enc = DenseEncoder(model.visual)
    x = _randn(2, 3, 32, 40, seed=12)
    out = enc(x, svc_blocks=enc.last_blocks(n_svc))
    assert out.svc_blocks == tuple(range(4 - n_svc, 4))
    with torch.no_grad():
        expected = naive_svc_features(model.visual, x, 4 - n_svc)
    assert_rel_close(out.features, expected, F64_REL, "SVC features")
    # a different calibrated set gives different features: the check above can tell them apart
    if n_svc < 4:
        with torch.no_grad():
            other = naive_svc_features(model.visual, x, 4 - n_svc - 1)
        assert rel_err(out.features, other) > 1e-3


def test_attention_maps_are_head_mean_softmax(model):
    enc = DenseEncoder(model.visual)
    x = _randn(1, 3, 32, 32, seed=13)
    out = enc(x, attn_blocks=(0, 2))
    assert out.attn.shape == (1, 2, 17, 17) and out.attn_blocks == (0, 2)
    block = model.visual.transformer.resblocks[2]
    y = block.ln_1(out.tokens[1])
    _, w = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    assert_rel_close(out.attn[:, 1], w, F64_REL, "attention map")
    assert_rel_close(out.attn.sum(-1), torch.ones(1, 2, 17), F64_REL, "row sums")


def test_any_input_size_never_mutates_parameters(model):
    enc = DenseEncoder(model.visual)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for size in [(32, 32), (48, 64), (24, 16), (100, 36)]:
        out = enc(_randn(1, 3, *size, seed=14), svc_blocks=enc.last_blocks(2), pos_via_grid=(5, 5))
        assert out.grid == (size[0] // 8, size[1] // 8)
        assert out.features.shape == (1, 1 + out.grid[0] * out.grid[1], 32)
        assert torch.isfinite(out.features).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pos_embed_interpolation_two_step_differs_and_is_cached(model):
    enc = DenseEncoder(model.visual)
    direct = enc.pos_embed((6, 6))
    via = enc.pos_embed((6, 6), via=(5, 5))
    assert direct.shape == via.shape == (37, 64)
    assert torch.equal(direct[0], model.visual.positional_embedding[0])
    assert not torch.allclose(direct, via)
    assert torch.equal(enc.pos_embed((4, 4)), model.visual.positional_embedding)  # native grid: untouched


def test_other_geometries():
    model = tiny_model(1, width=48, layers=3, patch=4, image=24, heads=3).double()
    enc = DenseEncoder(model.visual)
    x = _randn(1, 3, 40, 28, seed=15)
    out = enc(x, svc_blocks=enc.last_blocks(2), attn_blocks=enc.last_blocks(2))
    assert out.grid == (10, 7) and out.attn.shape == (1, 2, 71, 71)
    with torch.no_grad():
        assert_rel_close(out.features, naive_svc_features(model.visual, x, 1), F64_REL, "SVC features")


def test_bad_block_requests(model):
    enc = DenseEncoder(model.visual)
    with pytest.raises(ValueError, match="last 5 blocks"):
        enc.last_blocks(5)
    with pytest.raises(ValueError, match="last blocks in order"):
        enc(_randn(1, 3, 32, 32, seed=16), svc_blocks=(1, 3))
    with pytest.raises(ValueError, match="out of range"):
        enc(_randn(1, 3, 32, 32, seed=16), attn_blocks=(7,))


@pytest.mark.parametrize("n_svc", [0, 2])
def test_return_tokens_false_gives_the_same_features(model, n_svc):
    enc = DenseEncoder(model.visual)
    x = _randn(2, 3, 32, 48, seed=17)
    full = enc(x, svc_blocks=enc.last_blocks(n_svc), attn_blocks=(2, 3))
    lean = enc(x, svc_blocks=enc.last_blocks(n_svc), attn_blocks=(2, 3), return_tokens=False)
    assert lean.tokens == []
    for name in ("features", "pooled", "attn"):
        assert_rel_close(getattr(lean, name), getattr(full, name), F64_REL, name)


def test_no_block_runs_nn_multihead_attention(model32):
    """Every block's attention goes through ``F.scaled_dot_product_attention`` (or the explicit map where one is
    asked for): none through ``nn.MultiheadAttention``, whose CPU path holds the B×H×T×T map (1024 px: +930 MB vs
    +309 MB, docs/benchmarks.md). Checked with forward hooks on every block's ``attn`` module, for plain CLIP
    tokens, SVC and a peer attention mode."""
    calls = []
    hooks = [b.attn.register_forward_hook(lambda *_: calls.append(1)) for b in model32.visual.transformer.resblocks]
    try:
        enc = DenseEncoder(model32.visual)
        x = _randn(1, 3, 32, 32, seed=12, dtype=torch.float32)
        model32.encode_image(x)
        assert calls, "the hooks see open_clip's own forward"
        calls.clear()
        enc(x)
        enc(x, svc_blocks=enc.last_blocks(2), attn_blocks=(1,))
        enc(x, attention="sclip", return_tokens=False)
        assert not calls, f"{len(calls)} block(s) ran nn.MultiheadAttention"
    finally:
        for h in hooks:
            h.remove()
