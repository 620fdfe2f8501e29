"""TSE attribute banks: K-means, silhouette, building, saving, caching, identity checks, `excelseg bank`."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from excelseg.bank import (
    BANK_FORMAT,
    AttributeBank,
    bank_for,
    bank_sentences,
    build_bank,
    check_bank_identity,
    encode_sentences,
    save_bank,
)
from excelseg.cli import main
from excelseg.kmeans import auto_candidates, kmeans, select_clusters, silhouette_score
from excelseg.knowledge import load_knowledge
from excelseg.text import TextEncoder, enrich
from excelseg.vocab import COCO_CLASSES, VOC_CLASSES
from tiny_clip import save_tiny, tiny_clip

REF_BANK = (Path(__file__).resolve().parents[2] / "shared" / "parity"
            / "pascal_voc_desc_clip_ViT-B-16_gpt4.0_cluster_112_embedding_bank.pth")

SMALL_KB = {
    "cat": ["a small furry animal with whiskers", "pointed ears and a long tail",
            "curled up asleep on a cushion", "a striped grey coat"],
    "kettle": ["a metal vessel with a spout for boiling water", "steam rising from the spout",
               "a plastic jug with a blue light", "sitting on a stove"],
    "tulip": ["a cup-shaped red flower on a green stem", "petals in yellow and pink",
              "a field of flowers in spring", "long smooth leaves at the base"],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("EXCELSEG_OFFLINE", "1")


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0)


@pytest.fixture(scope="module")
def small_bank(clip):
    return build_bank(clip, SMALL_KB, 5, seed=0, progress=False)


def blobs(groups: int = 3, per: int = 25, dim: int = 16, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(groups, dim, generator=g), dim=1) * 3.0
    truth = torch.arange(groups).repeat_interleave(per)
    return centres[truth] + spread * torch.randn(groups * per, dim, generator=g), truth


# ------------------------------------------------------------------------------------------------ k-means


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs(groups=4, per=30)
    res = kmeans(x, 4, seed=0)
    assert res.labels.shape == (120,) and res.centres.shape == (4, 16)
    mapping = {int(t): set(res.labels[truth == t].tolist()) for t in range(4)}
    assert all(len(v) == 1 for v in mapping.values())  # each blob in one cluster
    assert len({next(iter(v)) for v in mapping.values()}) == 4  # different clusters
    for k in range(4):  # centres are the member means
        torch.testing.assert_close(res.centres[k], x[res.labels == k].double().mean(0))
    assert res.inertia == pytest.approx(float(((x.double() - res.centres[res.labels]) ** 2).sum()))


def test_kmeans_deterministic_for_a_seed_and_seed_dependent():
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
    a, b = kmeans(x, 15, seed=3), kmeans(x, 15, seed=3)
    assert torch.equal(a.centres, b.centres) and torch.equal(a.labels, b.labels) and a.inertia == b.inertia
    c, d = kmeans(x, 15, seed=3, n_init=1), kmeans(x, 15, seed=4, n_init=1)
    assert not torch.equal(c.labels, d.labels)


def test_kmeans_inertia_no_worse_than_naive_init():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(2))
    best = kmeans(x, 12, seed=0)
    naive = kmeans(x, 12, init=x[:12])  # first k points, one Lloyd run
    assert best.inertia <= naive.inertia + 1e-9
    assert kmeans(x, 12, seed=0, n_init=1).inertia >= best.inertia - 1e-9


def test_kmeans_reseeds_empty_clusters():
    x, _ = blobs(groups=2, per=10, dim=4)
    init = torch.cat([x[:1], x[10:11], torch.full((1, 4), 100.0)])  # the third centre attracts nobody
    res = kmeans(x, 3, init=init)
    assert torch.bincount(res.labels, minlength=3).min() >= 1


def test_kmeans_argument_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="between 1"):
        kmeans(x, 0)


# ------------------------------------------------------------------------------------- silhouette / auto


def test_silhouette_matches_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=g)
    labels = torch.tensor([0] * 8 + [1] * 9 + [2] * 5 + [3])  # includes a singleton cluster
    u = F.normalize(x.double(), dim=1)
    d = 1 - u @ u.T
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            scores.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == k].mean() for k in labels.unique() if k != labels[i])
        scores.append(float((b - a) / max(a, b)))
    assert silhouette_score(x, labels) == pytest.approx(sum(scores) / len(scores), abs=1e-9)


def test_auto_selection_picks_three_groups():
    x, _ = blobs(groups=3, per=20, dim=16, spread=0.3)
    best, scores = select_clusters(x, range(2, 9), seed=0)
    assert best == 3 and set(scores) == set(range(2, 9))
    assert scores[3] == max(scores.values())


def test_auto_candidates_range():
    c = auto_candidates(20, 400)
    assert c[0] == 20 and c[-1] == 160 and c == sorted(set(c)) and 8 <= len(c) <= 14
    assert auto_candidates(80, 1600)[-1] == 640
    assert auto_candidates(3, 15) == [3, 4, 5, 6, 7]
    assert auto_candidates(1, 10) == [2, 3, 4, 5]
    assert auto_candidates(3, 4) == [3]  # fewer sentences than 2 per class: a single candidate


# --------------------------------------------------------------------------------------------- building


def test_flags_and_centres_follow_the_assignments(clip, small_bank):
    texts, owners = bank_sentences(SMALL_KB)
    emb = encode_sentences(clip, texts, progress=False).double()
    a = small_bank.attributes.double()
    labels = torch.cdist(emb, a).argmin(1)  # converged K-means: every sentence sits in its nearest centre
    expected = torch.zeros(3, 5)
    expected[torch.tensor(owners), labels] = 1
    assert torch.equal(small_bank.flags, expected)
    for k in range(5):
        torch.testing.assert_close(a[k], emb[labels == k].mean(0), atol=1e-6, rtol=0)
    assert (small_bank.flags.sum(0) >= 1).all() and (small_bank.flags.sum(1) >= 1).all()
    norms = a.norm(dim=1)
    assert (norms <= 1 + 1e-6).all()  # means of unit vectors, not re-normalised


def test_metadata(small_bank):
    m = small_bank.meta
    assert m["format"] == BANK_FORMAT and m["clip_identity"] == "tiny:0"
    assert json.loads(m["classes"]) == list(SMALL_KB)
    assert (m["clusters"], m["seed"], m["prefix"], m["embed_dim"]) == ("5", "0", "a clean origami {}.", "32")
    assert len(m["knowledge_sha256"]) == 64 and all(isinstance(v, str) for v in m.values())


def test_prefix_on_and_off(clip, small_bank):
    on, _ = bank_sentences(SMALL_KB)
    off, _ = bank_sentences(SMALL_KB, prefix=None)
    assert on[0] == "a clean origami cat. a small furry animal with whiskers" and off[0] == SMALL_KB["cat"][0]
    assert bank_sentences({"Cat": ["Whiskers"]}, "a photo of a {}.")[0] == ["a photo of a cat. whiskers"]
    e_on, e_off = encode_sentences(clip, on, progress=False), encode_sentences(clip, off, progress=False)
    assert (e_on - e_off).abs().max() > 1e-3
    no_prefix = build_bank(clip, SMALL_KB, 5, seed=0, prefix=None, progress=False)
    assert no_prefix.meta["prefix"] == "" and not torch.equal(no_prefix.attributes, small_bank.attributes)


def test_build_save_load_round_trip(clip, small_bank, tmp_path):
    path = save_bank(small_bank, tmp_path / "bank.safetensors")
    loaded = AttributeBank.load(path)
    assert torch.equal(loaded.attributes, small_bank.attributes)
    assert torch.equal(loaded.flags, small_bank.flags)
    assert loaded.meta == small_bank.meta
    prompts = [f"a clean origami {c}." for c in ("cat", "dog", "car")]
    text = TextEncoder(clip.model, clip.tokenizer).encode(prompts)
    for got, want in zip(enrich(text, loaded.attributes, 0.9), enrich(text, small_bank.attributes, 0.9)):
        assert torch.equal(got, want)
    check_bank_identity(loaded, clip)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_bank(small_bank, tmp_path / "bank.pth")


@pytest.mark.parametrize("name, classes, clusters", [("voc", VOC_CLASSES, 112), ("coco", COCO_CLASSES, 224)])
def test_shipped_knowledge_builds(clip, name, classes, clusters):
    bank = build_bank(clip, load_knowledge(name), clusters, progress=False)
    assert bank.attributes.shape == (clusters, 32) and bank.flags.shape == (len(classes), clusters)
    assert (bank.flags.sum(1) >= 1).all() and (bank.flags.sum(0) >= 1).all()
    assert json.loads(bank.meta["classes"]) == list(classes)


def test_build_errors(clip):
    with pytest.raises(ValueError, match="cannot make 13 clusters from 12 sentences"):
        build_bank(clip, SMALL_KB, 13, progress=False)
    with pytest.raises(ValueError, match="class 'kettle' has no descriptions"):
        build_bank(clip, {**SMALL_KB, "kettle": []}, 2, progress=False)
    with pytest.raises(ValueError, match="class 'cat': descriptions must be a list of non-empty strings"):
        build_bank(clip, {**SMALL_KB, "cat": ["ok", ""]}, 2, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        build_bank(clip, SMALL_KB, 0, progress=False)
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        build_bank(clip, SMALL_KB, "many", progress=False)
    with pytest.raises(ValueError, match="must contain"):
        build_bank(clip, SMALL_KB, 2, prefix="origami", progress=False)


def test_truncation_warned_once(clip, caplog):
    long = " ".join(["enormous"] * 120)
    kb = {"cat": ["a furry animal", long], "kettle": ["a metal vessel", long + " again"]}
    with caplog.at_level(logging.WARNING, logger="excelseg.bank"):
        bank = build_bank(clip, kb, 2, progress=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 sentences" in warnings[0].getMessage()
    assert "77-token" in warnings[0].getMessage() and bank.num_attributes == 2


# ------------------------------------------------------------------------------------ identity and cache


def test_identity_mismatch_refused(small_bank, caplog):
    other = replace(tiny_clip(1), identity="sha256:" + "ab" * 32)
    with pytest.raises(ValueError, match=r"was built with CLIP tiny:0, but the CLIP in use is sha256:abab.*"
                                         r"rebuild it with `excelseg bank build"):
        check_bank_identity(small_bank, other)
    anonymous = AttributeBank(small_bank.attributes, small_bank.flags, {}, "ref.pth")
    with caplog.at_level(logging.INFO, logger="excelseg.bank"):
        check_bank_identity(anonymous, other)
    assert "records no CLIP identity" in caplog.text
    with pytest.raises(ValueError, match="holds 16-d attributes but the CLIP in use .* has 32-d"):
        check_bank_identity(AttributeBank(torch.randn(4, 16)), other)


def test_bank_cache_builds_once(tmp_path):
    clip = tiny_clip(0)
    forwards = []
    handle = clip.model.token_embedding.register_forward_hook(lambda m, i, o: forwards.append(o.shape[0]))
    try:
        first = bank_for(clip, SMALL_KB, 4, seed=0, cache_dir=tmp_path, progress=False)
        n_first = len(forwards)
        second = bank_for(clip, SMALL_KB, 4, seed=0, cache_dir=tmp_path, progress=False)
        assert n_first >= 1 and len(forwards) == n_first  # loaded from the file: no text forward
        files = list((tmp_path / "banks").glob("*.safetensors"))
        assert len(files) == 1 and second.source == str(files[0])
        assert torch.equal(first.attributes, second.attributes) and first.meta == second.meta
        bank_for(clip, SMALL_KB, 4, seed=1, cache_dir=tmp_path, progress=False)  # other settings: new file
        assert len(forwards) > n_first and len(list((tmp_path / "banks").glob("*.safetensors"))) == 2
    finally:
        handle.remove()


def test_bank_for_refuses_a_cached_bank_of_another_clip(tmp_path):
    clip = tiny_clip(0)
    bank_for(clip, SMALL_KB, 3, cache_dir=tmp_path, progress=False)
    (path,) = (tmp_path / "banks").glob("*.safetensors")
    bank = AttributeBank.load(path)
    bank.meta["clip_identity"] = "someone-else"
    save_bank(bank, path)
    with pytest.raises(ValueError, match="was built with CLIP someone-else"):
        bank_for(clip, SMALL_KB, 3, cache_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("w") / "tiny.pt")


def test_cli_build_auto(tmp_path, tiny_file, capsys):
    kb = {**SMALL_KB, "cat": [*SMALL_KB["cat"], "a black cat", "a white cat"]}
    kb_path = tmp_path / "kb.json"
    kb_path.write_text(json.dumps(kb))
    out = tmp_path / "bank.safetensors"
    rc = main(["bank", "build", "--knowledge", str(kb_path), "--clusters", "auto", "--clip", str(tiny_file),
               "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    bank = AttributeBank.load(out)
    assert f"B = {bank.num_attributes} (chosen by silhouette" in text
    assert str(out) in text and "encode" in text
    assert bank.meta["clusters_requested"] == "auto" and bank.meta["clip_identity"].startswith("sha256:")
    scores = json.loads(bank.meta["auto_scores"])
    assert str(bank.num_attributes) in scores and len(scores) >= 2

    rc = main(["bank", "build", "--knowledge", str(kb_path), "--clip", str(tiny_file), "--out", str(out)])
    assert rc == 2 and "give --clusters" in capsys.readouterr().err
    rc = main(["bank", "build", "--knowledge", str(tmp_path / "nope.json"), "--clusters", "3",
               "--clip", str(tiny_file), "--out", str(out)])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = main(["bank", "build", "--knowledge", str(kb_path), "--clusters", "99", "--clip", str(tiny_file),
               "--out", str(out)])
    assert rc == 2 and "cannot make 99 clusters from 14 sentences" in capsys.readouterr().err
    assert main(["bank", "build", "--knowledge", "voc", "--clusters", "0", "--out", str(out)]) == 2
    assert "--clusters must be a positive integer" in capsys.readouterr().err


def _import_and_check(src: Path, out: Path, centres: torch.Tensor, flags: torch.Tensor, capsys) -> None:
    assert main(["bank", "import", str(src), "--out", str(out)]) == 0
    assert "clip_identity: empty" in capsys.readouterr().out
    bank = AttributeBank.load(out)
    assert torch.equal(bank.attributes, centres.T.contiguous()) and torch.equal(bank.flags, flags)
    assert bank.meta["format"] == BANK_FORMAT and bank.meta["clip_identity"] == ""
    assert bank.meta["clusters"] == str(centres.shape[1]) and bank.meta["embed_dim"] == str(centres.shape[0])
    assert main(["bank", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"attributes: {centres.shape[1]} x {centres.shape[0]} float32" in info
    assert "clusters per class:" in info


def test_import_synthetic_reference_list(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    attrs = F.normalize(torch.randn(7, 32, generator=g), dim=1)
    centres = attrs.T  # (E, B) non-contiguous view, as the reference saved it
    flags = torch.zeros(3, 7)
    flags[torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.arange(7)] = 1
    src = tmp_path / "ref_bank.pth"
    torch.save([centres, flags], src)
    _import_and_check(src, tmp_path / "bank.safetensors", centres, flags, capsys)
    assert main(["bank", "import", str(src), "--out", str(tmp_path / "named.safetensors"), "--classes",
                 "cat,dog,car"]) == 0
    assert main(["bank", "info", str(tmp_path / "named.safetensors")]) == 0
    assert "cat 2, dog 2, car 3" in capsys.readouterr().out
    assert main(["bank", "import", str(src), "--out", str(tmp_path / "x.safetensors"),
                 "--classes", "voc"]) == 2


@pytest.mark.skipif(not REF_BANK.is_file(), reason="reference bank of the parity kit not present")
def test_import_reference_voc_bank(tmp_path, capsys):
    centres, flags = torch.load(REF_BANK, map_location="cpu", weights_only=True)
    _import_and_check(REF_BANK, tmp_path / "voc_ref.safetensors", centres, flags, capsys)
    assert main(["bank", "import", str(REF_BANK), "--out", str(tmp_path / "v.safetensors"), "--classes",
                 "voc"]) == 0
    assert main(["bank", "info", str(tmp_path / "v.safetensors")]) == 0
    assert "person 10" in capsys.readouterr().out  # the reference gives person 10 clusters
