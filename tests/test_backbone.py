"""Dense forward + SVC against an independent, literal implementation of EXCEL_SPEC §1.1 / §3.1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from excelseg.backbone import DenseEncoder, interpolate_pos_embed
from tiny_clip import tiny_model


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
def model():
    return tiny_model(0, layers=4)


def test_original_path_equals_open_clip(model):
    enc = DenseEncoder(model.visual)
    x = torch.randn(2, 3, 32, 32)
    out = enc(x, svc_blocks=enc.last_blocks(2), attn_blocks=(1, 3))
    torch.testing.assert_close(out.pooled, model.encode_image(x), atol=1e-5, rtol=1e-5)
    ref = model.visual.forward_intermediates(x, indices=4, output_fmt="NLC", output_extra_tokens=True)
    for layer, (patch, cls) in enumerate(zip(ref["image_intermediates"], ref["image_intermediates_prefix"])):
        torch.testing.assert_close(out.tokens[layer], torch.cat([cls, patch], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_svc", [0, 1, 2, 4])
def test_exactly_the_last_blocks_are_calibrated(model, n_svc):
    enc = DenseEncoder(model.visual)
    x = torch.randn(2, 3, 32, 40)
    out = enc(x, svc_blocks=enc.last_blocks(n_svc))
    assert out.svc_blocks == tuple(range(4 - n_svc, 4))
    with torch.no_grad():
        expected = naive_svc_features(model.visual, x, 4 - n_svc)
    torch.testing.assert_close(out.features, expected, atol=1e-4, rtol=1e-4)
    # a different calibrated set gives different features: the check above can tell them apart
    other = naive_svc_features(model.visual, x, 4 - n_svc - 1) if n_svc < 4 else None
    if other is not None:
        assert (out.features - other).abs().max() > 1e-3


def test_attention_maps_are_head_mean_softmax(model):
    enc = DenseEncoder(model.visual)
    x = torch.randn(1, 3, 32, 32)
    out = enc(x, attn_blocks=(0, 2))
    assert out.attn.shape == (1, 2, 17, 17) and out.attn_blocks == (0, 2)
    block = model.visual.transformer.resblocks[2]
    y = block.ln_1(out.tokens[1])
    _, w = block.attn(y, y, y, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(out.attn[:, 1], w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(1, 2, 17))


def test_any_input_size_never_mutates_parameters(model):
    enc = DenseEncoder(model.visual)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for size in [(32, 32), (48, 64), (24, 16), (100, 36)]:
        out = enc(torch.randn(1, 3, *size), svc_blocks=enc.last_blocks(2), pos_via_grid=(5, 5))
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
    model = tiny_model(1, width=48, layers=3, patch=4, image=24, heads=3)
    enc = DenseEncoder(model.visual)
    x = torch.randn(1, 3, 40, 28)
    out = enc(x, svc_blocks=enc.last_blocks(2), attn_blocks=enc.last_blocks(2))
    assert out.grid == (10, 7) and out.attn.shape == (1, 2, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(out.features, naive_svc_features(model.visual, x, 1), atol=1e-4, rtol=1e-4)


def test_bad_block_requests(model):
    enc = DenseEncoder(model.visual)
    with pytest.raises(ValueError, match="last 5 blocks"):
        enc.last_blocks(5)
    with pytest.raises(ValueError, match="last blocks in order"):
        enc(torch.randn(1, 3, 32, 32), svc_blocks=(1, 3))
    with pytest.raises(ValueError, match="out of range"):
        enc(torch.randn(1, 3, 32, 32), attn_blocks=(7,))


@pytest.mark.parametrize("n_svc", [0, 2])
def test_return_tokens_false_gives_the_same_features(model, n_svc):
    enc = DenseEncoder(model.visual)
    x = torch.randn(2, 3, 32, 48)
    full = enc(x, svc_blocks=enc.last_blocks(n_svc), attn_blocks=(2, 3))
    lean = enc(x, svc_blocks=enc.last_blocks(n_svc), attn_blocks=(2, 3), return_tokens=False)
    assert lean.tokens == []
    torch.testing.assert_close(lean.features, full.features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.attn, full.attn)
