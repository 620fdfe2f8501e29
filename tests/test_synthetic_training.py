"""Training data of the synthetic world: caption variety and hard negatives for ``train-clip``, and generated
scenes as a dataset for the single-stage trainer (``--dataset synthetic``). Fast: no model is trained here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from excelseg.data import open_dataset
from excelseg.synthetic import CLASSES, HELD_OUT_SEED, SceneGenerator, held_out_samples, synthetic_vocabulary
from excelseg.synthetic.captions import CAPTION_STYLES, CaptionSampler
from excelseg.synthetic.clip_train import contrastive_loss, training_batch
from excelseg.vocab import dataset_vocabulary


def _named(text: str) -> set[int]:
    """Class indices whose name appears in a caption (names are unique colour + shape pairs)."""
    return {i for i, c in enumerate(CLASSES) if f"{c.colour} {c.shape}" in text}


def test_mixed_captions_name_every_object_and_use_every_style():
    gen, sampler = SceneGenerator(96, seed=5), CaptionSampler("mixed")
    rng = np.random.default_rng(0)
    styles = set()
    for i in range(60):
        scene = gen.scene(i)
        caption, style = sampler.caption(scene, rng)
        styles.add(style)
        assert _named(caption) == set(scene.labels), (caption, scene.names)
        if style == "names":
            assert caption.endswith(".") and "with" not in caption
    assert styles == set(CAPTION_STYLES)


def test_full_captions_are_the_generators():
    gen, sampler = SceneGenerator(96, seed=5), CaptionSampler("full")
    rng = np.random.default_rng(0)
    for i in range(5):
        assert sampler.caption(gen.scene(i), rng) == (gen.scene(i).caption, "full")
    with pytest.raises(ValueError, match="caption mode"):
        CaptionSampler("short")


def test_hard_negative_swaps_one_object_for_a_lookalike():
    gen, sampler = SceneGenerator(96, seed=6), CaptionSampler("mixed")
    rng = np.random.default_rng(1)
    for i in range(40):
        scene = gen.scene(i)
        _, style = sampler.caption(scene, rng)
        text, labels = sampler.hard_negative(scene, style, rng)
        named = _named(text)
        assert named == set(np.flatnonzero(labels)) and len(named) == len(scene.labels)
        (gone,), (new,) = set(scene.labels) - named, named - set(scene.labels)
        assert CLASSES[gone].colour == CLASSES[new].colour or CLASSES[gone].shape == CLASSES[new].shape


def test_training_batch_keeps_scenes_and_is_seeded():
    gen = SceneGenerator(32, seed=3)
    a = training_batch(gen, CaptionSampler("mixed"), 2, 6, 0, 0.5)
    b = training_batch(gen, CaptionSampler("mixed"), 2, 6, 0, 0.5)
    ref_images, _, ref_labels, _ = gen.batch(12, 6)
    assert np.array_equal(a[0], ref_images) and np.array_equal(a[1], ref_labels)  # scenes as generated
    assert a[2] == b[2] and a[3] == b[3] and len(a[3]) == len(a[4])


def test_hard_negatives_enter_only_the_image_side_and_same_sets_are_masked():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.eye(4, 5)
    scale = torch.tensor(10.0)
    base = contrastive_loss(img, txt, scale, labels)
    neg = F.normalize(torch.randn(2, 8), dim=-1)
    harder = contrastive_loss(img, txt, scale, labels, neg, torch.zeros(2, 5))
    assert harder > base  # more negatives, larger image-to-text loss
    # a "negative" that holds exactly an image's own classes is masked for that image: here, for every image
    same = contrastive_loss(img, txt, scale, labels, img.clone(), labels.clone())
    # masked for its own image, it still counts for the other three
    assert torch.isfinite(same) and same > base
    only_self = contrastive_loss(img[:1], txt[:1], scale, labels[:1], img[:1].clone(), labels[:1].clone())
    assert torch.allclose(only_self, contrastive_loss(img[:1], txt[:1], scale, labels[:1]))


def test_synthetic_dataset_splits_match_the_held_out_scenes():
    val = open_dataset("synthetic", split="val")
    assert val.kind == "synthetic" and val.has_masks and len(val) == 100
    s = val[3]
    image, mask, labels = list(held_out_samples(4, 96, HELD_OUT_SEED))[3]
    assert np.array_equal(s["image"], image) and np.array_equal(s["mask"], mask)
    assert np.flatnonzero(s["label"]).tolist() == list(labels)
    assert val.class_ids(val.ids[3]) == [c + 1 for c in labels]
    train = open_dataset("synthetic", split="train", with_mask=False)
    assert "mask" not in train[0] and not np.array_equal(train[0]["image"], val[0]["image"])
    with pytest.raises(ValueError, match="not a synthetic split"):
        open_dataset("synthetic", split="train_aug")
    vocab = dataset_vocabulary(val.class_names, val.kind)
    assert vocab == synthetic_vocabulary()
