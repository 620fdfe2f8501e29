"""LVC adapter and decoder (EXCEL_SPEC §4.1, §5.1), the reference key map and checkpoint import (interop, CLI)."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from excelseg.heads import ExcelHeads, LvcAdapter, SegDecoder, count_parameters, reference_key_map
from excelseg.interop import convert_reference_state, import_reference_heads
from excelseg.io.checkpoint import CheckpointError, load_heads
from numerics import F64_REL, assert_rel_close
from parity_kit import PARITY, require_kit


def test_parameter_counts_from_the_spec():
    # EXCEL_SPEC §4.1, §5.1, §11: adapter 3,938,560; decoder 2,374,677 (VOC); total 6,313,237 / 6,328,657 (COCO)
    voc = ExcelHeads(21)
    assert count_parameters(voc.adapter) == 3_938_560
    assert count_parameters(voc.decoder) == 2_374_677
    assert count_parameters(voc) == 6_313_237
    assert count_parameters(ExcelHeads(81)) == 6_328_657


def test_adapter_is_per_layer_mlp_concat_fuse():
    torch.manual_seed(0)
    ad = LvcAdapter(num_layers=3, in_dim=8, dim=4).eval().double()  # float64: compared with F64_REL
    x = torch.randn(2, 3, 8, 2, 5, dtype=torch.float64)  # (B, L, D, h, w)
    parts = []
    for layer, mlp in enumerate(ad.mlps):
        tok = x[:, layer]  # (B, D, h, w)
        hid = torch.einsum("od,bdhw->bohw", mlp.fc1.weight, tok) + mlp.fc1.bias.view(1, -1, 1, 1)
        parts.append(torch.einsum("oi,bihw->bohw", mlp.fc2.weight, hid.clamp(min=0))
                     + mlp.fc2.bias.view(1, -1, 1, 1))
    cat = torch.cat(parts, dim=1)  # layer 0 first
    want = torch.einsum("oc,bchw->bohw", ad.fuse.weight[:, :, 0, 0], cat) + ad.fuse.bias.view(1, -1, 1, 1)
    assert_rel_close(ad(x), want, F64_REL, "adapter")
    with pytest.raises(ValueError, match="tokens must be"):
        ad(x[:, :2])


def test_adapter_dropout2d_only_in_training():
    torch.manual_seed(1)
    ad = LvcAdapter(num_layers=2, in_dim=8, dim=64)
    x = torch.randn(4, 2, 8, 3, 3)
    ad.train()
    y = ad(x)
    dead = (y == 0).flatten(2).all(-1)  # whole channel maps dropped
    assert 0 < int(dead.sum()) < dead.numel()
    ad.eval()
    assert torch.equal(ad(x), ad(x)) and not (ad(x) == 0).flatten(2).all(-1).any()


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def test_decoder_equals_torch_pre_ln_transformer():
    torch.manual_seed(2)
    dec = SegDecoder(num_outputs=5, dim=32, heads=4, depth=2).eval().double()  # float64: compared with F64_REL
    with torch.no_grad():  # non-trivial LayerNorm / bias values
        for name, p in dec.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    layers = []
    for blk in dec.blocks:
        t = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, dropout=0.0, activation=_quick_gelu,
                                       batch_first=True, norm_first=True).eval().double()
        sd = {"self_attn.in_proj_weight": blk.attn.in_proj_weight, "self_attn.in_proj_bias": blk.attn.in_proj_bias,
              "self_attn.out_proj.weight": blk.attn.out_proj.weight, "self_attn.out_proj.bias": blk.attn.out_proj.bias,
              "linear1.weight": blk.mlp.fc.weight, "linear1.bias": blk.mlp.fc.bias,
              "linear2.weight": blk.mlp.proj.weight, "linear2.bias": blk.mlp.proj.bias,
              "norm1.weight": blk.ln_1.weight, "norm1.bias": blk.ln_1.bias,
              "norm2.weight": blk.ln_2.weight, "norm2.bias": blk.ln_2.bias}
        t.load_state_dict({k: v.detach() for k, v in sd.items()})
        layers.append(t)
    fts = torch.randn(2, 32, 3, 4, dtype=torch.float64)
    x = fts.flatten(2).transpose(1, 2)
    with torch.no_grad():
        for t in layers:
            x = t(x)
        want = dec.classifier(x.transpose(1, 2).reshape(2, 32, 3, 4))
        assert_rel_close(dec(fts), want, F64_REL, "decoder")


def test_reference_key_map_covers_every_tensor_once():
    m = reference_key_map()
    assert len(m) == 88 and len(set(m.values())) == 88
    assert set(m.values()) == set(ExcelHeads(21).state_dict())


def _reference_state(heads: ExcelHeads, prefix: str = "module.") -> dict[str, torch.Tensor]:
    inverse = {ours: ref for ref, ours in reference_key_map().items()}
    sd = {prefix + inverse[k]: v.clone() for k, v in heads.state_dict().items()}
    sd[prefix + "encoder.visual.proj"] = torch.zeros(768, 512)  # frozen CLIP: dropped on import
    sd[prefix + "encoder.positional_embedding"] = torch.zeros(77, 512)
    return sd


@pytest.fixture(scope="module")
def ref_heads():
    torch.manual_seed(3)
    return ExcelHeads(21)


def test_import_ddp_pth_with_frozen_clip(tmp_path, ref_heads):
    path = tmp_path / "model_iter_30000.pth"
    torch.save(_reference_state(ref_heads), path)
    state = import_reference_heads(path, num_classes=20)
    assert set(state) == set(ref_heads.state_dict())
    assert all(torch.equal(state[k], v) for k, v in ref_heads.state_dict().items())


def test_import_refuses_unknown_missing_and_misshaped_keys(ref_heads):
    sd = _reference_state(ref_heads, prefix="")
    bad = dict(sd, **{"decoder.extra.weight": torch.zeros(3), "aux_head.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"2 unknown key\(s\): aux_head.bias, decoder.extra.weight"):
        convert_reference_state(bad)
    missing = {k: v for k, v in sd.items() if "resblocks.1.ln_2" not in k}
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): decoder.transformer.resblocks.1.ln_2.bias, "
                                              r"decoder.transformer.resblocks.1.ln_2.weight"):
        convert_reference_state(missing)
    shaped = dict(sd, **{"decoder_fts_fuse.linear_fuse.bias": torch.zeros(255)})
    with pytest.raises(CheckpointError, match=r"decoder_fts_fuse.linear_fuse.bias \(255,\) \(expected \(256,\)\)"):
        convert_reference_state(shaped)
    with pytest.raises(CheckpointError, match="21 outputs; expected 81"):
        convert_reference_state(sd, num_classes=80)


def test_import_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"decoder.linear_pred.weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, path)  # not weights
    with pytest.raises(CheckpointError, match="weights_only=True"):
        import_reference_heads(path)
    with pytest.raises(FileNotFoundError):
        import_reference_heads(tmp_path / "nope.pth")


def test_cli_import_checkpoint(tmp_path, ref_heads, capsys):
    from excelseg.cli import main
    from excelseg.interop import source_sha256

    src = tmp_path / "ref.pth"
    torch.save(_reference_state(ref_heads), src)
    out = tmp_path / "heads.safetensors"
    assert main(["import-checkpoint", str(src), "--out", str(out)]) == 0
    assert "6,313,237 parameters (20 classes: aeroplane" in capsys.readouterr().out
    state, meta = load_heads(out)
    assert all(torch.equal(state[k], v) for k, v in ref_heads.state_dict().items())
    assert meta["source_sha256"] == source_sha256(src) and meta["num_outputs"] == "21"
    assert main(["import-checkpoint", str(src), "--out", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    torch.save(dict(_reference_state(ref_heads), **{"module.decoder.extra": torch.zeros(1)}), broken)
    assert main(["import-checkpoint", str(broken), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "unknown key(s): decoder.extra" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not an excelseg heads checkpoint"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_heads(tmp_path / "other.safetensors")


def test_kit_reference_heads_import():
    require_kit()
    state = import_reference_heads(PARITY / "ref_heads_seed0.safetensors", num_classes=20)
    assert len(state) == 88 and sum(v.numel() for v in state.values()) == 6_313_237
    heads = ExcelHeads(21)
    heads.load_state_dict(state, strict=True)
    # spot check of the map: the reference's decoder classifier is the 1×1 conv (21, 256, 1, 1)
    from safetensors.torch import load_file

    ref = load_file(str(PARITY / "ref_heads_seed0.safetensors"))
    assert torch.equal(heads.decoder.classifier.weight, ref["decoder.linear_pred.weight"])
    assert torch.equal(heads.adapter.mlps[11].fc2.bias, ref["decoder_fts_fuse.linears_modulelist.11.proj_2.bias"])
