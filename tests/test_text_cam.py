"""TSE enrichment, bank formats and the patch–text alignment, against literal implementations of EXCEL_SPEC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from excelseg.bank import AttributeBank
from excelseg.cam import surgery_cams
from excelseg.config import TextConfig
from excelseg.text import TextEncoder, build_prompts, class_text_features, enrich
from excelseg.vocab import Vocabulary
from tiny_clip import tiny_clip


def literal_enrich(t, a, keep, tau, lam):
    """Row by row, sorting in Python: lowest floor((1-keep)·B) logits → -inf, softmax, add, normalise."""
    out = []
    for row in t:
        s = (a @ row).tolist()
        n_drop = math.floor((1 - keep) * len(s) + 1e-9)
        dropped = set(sorted(range(len(s)), key=lambda j: s[j])[:n_drop])
        kept = [j for j in range(len(s)) if j not in dropped]
        m = max(s[j] / tau for j in kept)
        w = {j: math.exp(s[j] / tau - m) for j in kept}
        z = sum(w.values())
        vec = row.clone()
        for j in kept:
            vec = vec + lam * (w[j] / z) * a[j]
        out.append(vec / vec.norm())
    return torch.stack(out)


@pytest.mark.parametrize("keep,tau,lam", [(0.9, 1.0, 1.0), (0.5, 0.1, 0.3), (1.0, 2.0, 1.0)])
def test_enrich_matches_literal(keep, tau, lam):
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1)
    a = torch.randn(13, 16, generator=g, dtype=torch.float64) * 0.3
    got, logits, w = enrich(t, a, keep, tau, lam)
    torch.testing.assert_close(got, literal_enrich(t, a, keep, tau, lam))
    assert (w == 0).sum(1).tolist() == [math.floor((1 - keep) * 13 + 1e-9)] * 5
    torch.testing.assert_close(logits, t @ a.T)


def test_paper_keep_ratio_counts():
    t = F.normalize(torch.randn(3, 8), dim=-1)
    for b, dropped in [(112, 11), (224, 22), (10, 1)]:
        _, _, w = enrich(t, torch.randn(b, 8), 0.9)
        assert (w == 0).sum(1).tolist() == [dropped] * 3


def test_bank_formats_give_identical_enrichment(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(32, 7, generator=g)  # reference orientation: E × B
    flags = (torch.rand(4, 7, generator=g) > 0.5).float()
    torch.save([centres.T.contiguous().T, flags], tmp_path / "ref.pth")  # non-contiguous like the shipped file
    save_file({"attributes": centres.T.contiguous(), "flags": flags}, str(tmp_path / "own.safetensors"),
              metadata={"clusters": "7"})
    np.savez(tmp_path / "kit.npz", centres=centres.numpy(), flags=flags.numpy())
    banks = [AttributeBank.load(tmp_path / n) for n in ("ref.pth", "own.safetensors", "kit.npz")]
    t = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    outs = [enrich(t, b.attributes)[0] for b in banks]
    for b in banks:
        assert b.num_attributes == 7 and torch.equal(b.flags, flags)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert banks[1].meta == {"clusters": "7"}


def test_bank_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        AttributeBank.load(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read attribute bank"):
        AttributeBank.load(tmp_path / "junk.pth")
    torch.save({"a": torch.zeros(2)}, tmp_path / "dict.pth")
    with pytest.raises(ValueError, match="reference format"):
        AttributeBank.load(tmp_path / "dict.pth")
    with pytest.raises(ValueError, match="another CLIP"):
        enrich(torch.randn(2, 16), torch.randn(5, 8))


def test_text_features_cached_and_unit_norm():
    clip = tiny_clip(0)
    enc = TextEncoder(clip.model, clip.tokenizer)
    vocab = Vocabulary.from_names(["cat", "dog"])
    feats = class_text_features(enc, vocab, TextConfig())
    assert feats.shape == (2 + len(vocab.background), 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(feats)))
    n_cached = len(enc._cache)
    class_text_features(enc, vocab, TextConfig())
    assert len(enc._cache) == n_cached
    prompts = build_prompts(vocab, "a photo of a {}.")
    assert prompts[:2] == ["a photo of a cat.", "a photo of a dog."]
    with pytest.raises(ValueError, match="must contain"):
        build_prompts(vocab, "no slot")
    bank = AttributeBank(torch.randn(6, 32))
    enriched = class_text_features(enc, vocab, TextConfig(), bank)
    assert not torch.allclose(enriched[:2], feats[:2])
    torch.testing.assert_close(enriched[2:], feats[2:])  # background rows are not enriched by default
    all_rows = class_text_features(enc, vocab, TextConfig(enrich_background=True), bank)
    assert not torch.allclose(all_rows[2:], feats[2:])


def literal_surgery(features, text, num_fg):
    """The reference's explicit B×T×V×E feature-surgery product (CLIP-Surgery), token-axis normalisation."""
    f = features / features.norm(dim=1, keepdim=True)
    prod = f[:, :, None, :] * text[None, None, :, :]  # B, T, V, E
    w = torch.softmax(2 * (f[:, 0] @ text.T), dim=-1)
    w = w / w.mean(-1, keepdim=True)
    prod = prod * w[:, None, :, None]
    redundant = prod.mean(2, keepdim=True)
    sim = (prod - redundant).sum(-1)
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    sim = (sim - lo) / (hi - lo)
    return sim[:, 1:, :num_fg].transpose(1, 2)


def test_surgery_cams_matches_explicit_product():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 10, 16, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(7, 16, generator=g, dtype=torch.float64), dim=-1)
    got = surgery_cams(feats, text, 4)
    assert got.shape == (2, 4, 9)
    torch.testing.assert_close(got, literal_surgery(feats, text, 4))
    assert got.min() >= 0 and got.max() <= 1
    per_token = surgery_cams(feats, text, 4, feature_norm="channels")
    assert not torch.allclose(per_token, got)
    with pytest.raises(ValueError, match="feature_norm"):
        surgery_cams(feats, text, 4, feature_norm="bogus")


def test_vocabulary_dependence():
    """The class-mean subtraction and CLS weights depend on the vocabulary, not only the present classes."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 10, 16, generator=g)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    assert not torch.allclose(surgery_cams(feats, text, 2), surgery_cams(feats, text[:3], 2))
