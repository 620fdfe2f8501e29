"""excelseg.synthetic: deterministic scenes, exact masks, captions, knowledge base and the dataset writer."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from excelseg.io.files import read_label_png
from excelseg.io.images import read_image
from excelseg.knowledge import parse_knowledge
from excelseg.synthetic import (
    CLASSES,
    COLOURS,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_IMAGE_FRACTION,
    PATTERNS,
    SHAPE_AREA,
    SHAPES,
    SIZES,
    ClassSpec,
    SceneGenerator,
    caption_phrase,
    knowledge_base,
    shape_test,
    write_dataset,
)

N_SCENES = 48


@pytest.fixture(scope="module")
def gen() -> SceneGenerator:
    return SceneGenerator(size=96, seed=7)


@pytest.fixture(scope="module")
def scenes(gen):
    return [gen.scene(i) for i in range(N_SCENES)]


def _expected_mask(scene, size: int) -> np.ndarray:
    """The class of the top-most (last drawn) object covering each pixel centre, recomputed object by object."""
    expected = np.zeros((size, size), dtype=np.uint8)
    for obj in scene.objects:
        expected[obj.coverage(size)] = obj.class_index + 1
    return expected


# ----------------------------------------------------------------------------------------------------------------
# classes


def test_class_table_shares_every_attribute_value():
    assert 12 <= len(CLASSES) <= 20
    assert len({c.name for c in CLASSES}) == len(CLASSES)
    assert len({c.attributes for c in CLASSES}) == len(CLASSES)
    for values, field in ((SHAPES, "shape"), (tuple(COLOURS), "colour"), (PATTERNS, "pattern"), (SIZES, "size")):
        counts = Counter(getattr(c, field) for c in CLASSES)
        assert set(counts) <= set(values)
        assert all(n >= 2 for n in counts.values()), (field, counts)
    # the name says colour and shape
    for c in CLASSES:
        assert c.colour in c.name and c.shape in c.name


def test_shapes_fit_the_unit_circle_and_differ():
    t = np.linspace(-1.3, 1.3, 261, dtype=np.float32)
    u, v = np.meshgrid(t, t)
    outside = u * u + v * v > 1.0001
    masks = {}
    for s in SHAPES:
        m = shape_test(s, u, v)
        assert not m[outside].any(), s
        assert m.any(), s
        masks[s] = m
        assert SHAPE_AREA[s] > 0.9
    # no two shapes are the same set, even after a rotation by a multiple of 90°
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                for k in range(4):
                    assert (masks[a] != np.rot90(masks[b], k)).mean() > 0.02, (a, b, k)


# ----------------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_and_index_give_identical_scenes_in_any_order():
    g1 = SceneGenerator(size=64, seed=3)
    g2 = SceneGenerator(size=64, seed=3)
    forward = [g1.scene(i) for i in range(6)]
    backward = {i: g2.scene(i) for i in reversed(range(6))}
    again = g1.scene(4)
    for i, a in enumerate(forward):
        b = backward[i]
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert a.labels == b.labels and a.caption == b.caption and a.boxes == b.boxes
    assert np.array_equal(again.image, forward[4].image) and np.array_equal(again.mask, forward[4].mask)


def test_different_seed_or_index_gives_different_scenes():
    a = SceneGenerator(size=64, seed=0).scene(1)
    b = SceneGenerator(size=64, seed=1).scene(1)
    c = SceneGenerator(size=64, seed=0).scene(2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


# ----------------------------------------------------------------------------------------------------------------
# masks and labels


def test_labels_are_the_classes_in_the_mask(gen, scenes):
    C = gen.num_classes
    min_pixels = math.ceil(MIN_VISIBLE_IMAGE_FRACTION * gen.size * gen.size)
    counts = Counter()
    for sc in scenes:
        assert sc.image.shape == (96, 96, 3) and sc.image.dtype == np.uint8
        assert sc.mask.shape == (96, 96) and sc.mask.dtype == np.uint8
        values = set(np.unique(sc.mask).tolist())
        assert 255 not in values and max(values) <= C
        assert sc.labels == tuple(sorted(v - 1 for v in values if v != 0))
        assert 1 <= len(sc.objects) <= 3 and len(sc.labels) == len(sc.objects)
        assert sc.names == tuple(CLASSES[c].name for c in sc.labels)
        counts[len(sc.objects)] += 1
        for obj, box in zip(sc.objects, sc.boxes):
            visible = sc.mask == obj.class_index + 1
            n = int(visible.sum())
            assert n == obj.visible_pixels
            assert n >= min_pixels
            assert n >= MIN_VISIBLE_FRACTION * SHAPE_AREA[obj.shape] * obj.radius**2 - 1
            ys, xs = np.nonzero(visible)
            assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert set(counts) == {1, 2, 3}


def test_mask_is_the_top_most_object_and_occlusion_happens(gen, scenes):
    occluded_pixels = 0
    occluded_scenes = 0
    for sc in scenes:
        assert np.array_equal(sc.mask, _expected_mask(sc, gen.size))
        covs = [o.coverage(gen.size) for o in sc.objects]
        hit = False
        for i in range(len(covs)):
            for j in range(i + 1, len(covs)):
                overlap = covs[i] & covs[j]
                later = np.zeros_like(overlap)
                for k in range(j + 1, len(covs)):
                    later |= covs[k]
                top_is_j = overlap & ~later
                if top_is_j.any():
                    hit = True
                    occluded_pixels += int(top_is_j.sum())
                    assert (sc.mask[top_is_j] == sc.objects[j].class_index + 1).all()
        occluded_scenes += hit
    assert occluded_scenes >= 5 and occluded_pixels > 200


def test_hand_built_overlap_keeps_the_later_object():
    g = SceneGenerator(size=64, num_objects=2, seed=0)
    for i in range(200):
        sc = g.scene(i)
        a, b = sc.objects
        both = a.coverage(64) & b.coverage(64)
        if both.any():
            ys, xs = np.nonzero(both)
            assert sc.mask[ys[0], xs[0]] == b.class_index + 1
            assert a.visible_pixels < int(a.coverage(64).sum())
            return
    pytest.fail("no two-object scene with overlapping objects in 200 scenes")


def test_object_colours_differ_from_the_background(scenes):
    for sc in scenes:
        img = sc.image.astype(np.float64)
        outside = img[sc.mask == 0].mean(axis=0)
        for obj in sc.objects:
            inside = img[sc.mask == obj.class_index + 1].mean(axis=0)
            assert np.linalg.norm(inside - outside) > 25.0, (sc.index, obj)


def test_image_regions_follow_the_mask(scenes):
    # no anti-aliasing: an object's pixels have its colour (± pattern tint, shading and noise)
    for sc in scenes[:12]:
        for obj in sc.objects:
            pixels = sc.image[sc.mask == obj.class_index + 1].astype(np.float64)
            base = np.array(obj.colour, dtype=np.float64)
            tint = base + 0.55 * (255.0 - base)
            d = np.minimum(np.linalg.norm(pixels - base, axis=1), np.linalg.norm(pixels - tint, axis=1))
            assert np.median(d) < 40.0


# ----------------------------------------------------------------------------------------------------------------
# captions


def test_captions_describe_every_object_and_nothing_else(scenes):
    for sc in scenes:
        present = {o.class_index for o in sc.objects}
        for c in present:
            spec = CLASSES[c]
            assert caption_phrase(spec) in sc.caption
            for word in (spec.colour, spec.shape, spec.size):
                assert re.search(rf"\b{word}\b", sc.caption)
            assert {"stripes": "stripes", "dots": "dots", "checker": "checker", "solid": "solid"}[
                spec.pattern] in sc.caption
        for c, spec in enumerate(CLASSES):
            if c not in present:
                assert caption_phrase(spec) not in sc.caption
        assert sc.caption.endswith("background")


# ----------------------------------------------------------------------------------------------------------------
# batch


def test_batch_matches_scenes():
    g = SceneGenerator(size=48, seed=5)
    images, masks, labels, captions = g.batch(3, 4)
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (4, 48, 48) and masks.dtype == np.uint8
    assert labels.shape == (4, len(CLASSES)) and labels.dtype == np.float32
    for i in range(4):
        sc = g.scene(3 + i)
        assert np.array_equal(images[i], sc.image) and np.array_equal(masks[i], sc.mask)
        assert tuple(np.flatnonzero(labels[i])) == sc.labels
        assert captions[i] == sc.caption


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_objects"):
        SceneGenerator(num_objects=(0, 2))
    with pytest.raises(ValueError, match="num_objects"):
        SceneGenerator(num_objects=(1, 17))
    with pytest.raises(ValueError, match="unknown shape"):
        SceneGenerator(classes=[ClassSpec("x", "hexagon", "red", "solid", "small")])
    with pytest.raises(ValueError, match="unique"):
        SceneGenerator(classes=[CLASSES[0], CLASSES[0]])
    with pytest.raises(ValueError, match="size"):
        SceneGenerator(size=8)


def test_custom_class_table():
    classes = CLASSES[:4]
    g = SceneGenerator(size=48, num_objects=(2, 2), classes=classes, seed=1)
    sc = g.scene(0)
    assert set(sc.labels) <= set(range(4)) and sc.mask.max() <= 4
    assert len(knowledge_base(classes)["classes"]) == 4


# ----------------------------------------------------------------------------------------------------------------
# knowledge


def test_knowledge_base_sentences():
    kb = knowledge_base()
    assert kb["format"] == "excelseg-knowledge/1"
    assert list(kb["classes"]) == [c.name for c in CLASSES]
    parsed = parse_knowledge(json.loads(json.dumps(kb)))
    assert list(parsed) == [c.name for c in CLASSES]
    owners: dict[str, set[str]] = {}
    for spec in CLASSES:
        entry = kb["classes"][spec.name]
        sentences = entry["descriptions"]
        assert entry["synonyms"] == []
        assert len(sentences) == 20 and len(set(sentences)) == 20
        assert all(s == " ".join(s.split()) and len(s.split()) >= 3 for s in sentences)
        for s in sentences:
            owners.setdefault(s, set()).add(spec.name)
            for other in CLASSES:
                if other.name != spec.name:
                    assert not re.search(rf"\b{re.escape(other.name)}s?\b", s, re.IGNORECASE), (spec.name, s)
        # every attribute is described
        text = " ".join(sentences)
        for word in (spec.colour, spec.size):
            assert word in text
    shared = {s: names for s, names in owners.items() if len(names) > 1}
    assert len(shared) >= 20
    striped = {c.name for c in CLASSES if c.pattern == "stripes"}
    assert owners["it has thin parallel stripes"] == striped
    # sentences about an attribute value are shared by exactly the classes having it
    for shape in SHAPES:
        having = {c.name for c in CLASSES if c.shape == shape}
        assert sum(1 for names in owners.values() if names == having) >= 5


# ----------------------------------------------------------------------------------------------------------------
# dataset on disk


def test_write_dataset_round_trip(tmp_path):
    out = write_dataset(tmp_path / "ds", n=3, seed=2, size=48)
    g = SceneGenerator(size=48, seed=2)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["captions.json", "dataset.json", "knowledge.json", "labels.json"]
        + [f"{d}/{i:05d}.png" for d in ("images", "masks") for i in range(3)]
    )
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind
    labels = json.loads((out / "labels.json").read_text())
    captions = json.loads((out / "captions.json").read_text())
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seed"] == 2 and meta["size"] == 48 and meta["n"] == 3
    assert [c["name"] for c in meta["classes"]] == [c.name for c in CLASSES]
    assert json.loads((out / "knowledge.json").read_text()) == knowledge_base()
    for i in range(3):
        sc = g.scene(i)
        stem = f"{i:05d}"
        assert np.array_equal(np.asarray(read_image(out / "images" / f"{stem}.png")), sc.image)
        assert np.array_equal(read_label_png(out / "masks" / f"{stem}.png"), sc.mask)
        assert labels[stem] == [CLASSES[c].name for c in sc.labels]
        assert captions[stem] == sc.caption


def test_shipped_synthetic_knowledge_and_vocabulary_match_the_generator():
    """The weights registry's ``synthetic`` knowledge base and vocabulary (shipped data, so the core never
    imports the generator) are the generator's own: same sentences per class, same classes and backgrounds."""
    from excelseg.knowledge import load_knowledge, parse_knowledge
    from excelseg.synthetic import synthetic_vocabulary
    from excelseg.synthetic.knowledge import knowledge_base
    from excelseg.vocab import Vocabulary

    assert load_knowledge("synthetic") == parse_knowledge(knowledge_base(), "generated")
    assert Vocabulary.named("synthetic") == synthetic_vocabulary()


def test_synthetic_weights_carry_their_defaults():
    from excelseg.weights import load_clip

    clip = load_clip("synthetic", device="cpu")
    assert (clip.default_config, clip.default_knowledge, clip.default_vocabulary, clip.examples) == (
        "synthetic", "synthetic", "synthetic", "scenes")
