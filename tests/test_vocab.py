from __future__ import annotations

import pytest

from excelseg.vocab import (
    COCO_BACKGROUND,
    COCO_CLASSES,
    COCO_PROMPT_NAMES,
    MAX_CLASSES,
    VOC_BACKGROUND,
    VOC_CLASSES,
    VOC_PROMPT_NAMES,
    Vocabulary,
    parse_class_list,
)


def test_paper_vocabularies():
    voc, coco = Vocabulary.named("voc"), Vocabulary.named("coco")
    assert (voc.num_classes, len(voc.background), len(voc.prompt_texts)) == (20, 25, 45)
    assert (coco.num_classes, len(coco.background), len(coco.prompt_texts)) == (80, 23, 103)
    assert len(set(VOC_CLASSES)) == 20 and len(set(COCO_CLASSES)) == 80
    assert len(VOC_PROMPT_NAMES) == 20 and len(COCO_PROMPT_NAMES) == 80
    assert set(VOC_BACKGROUND) - set(COCO_BACKGROUND) == {"keyboard", "sign"}
    assert voc.index("person") == 14 and voc.index("person with clothes,people,human") == 14
    assert coco.index("snowboard") == coco.index("sknowboard") == 31


def test_parse_class_list(tmp_path):
    assert parse_class_list("cat, dog ,sofa") == ["cat", "dog", "sofa"]
    (tmp_path / "c.txt").write_text("# my classes\ncat\n\ndog\n")
    assert parse_class_list(str(tmp_path / "c.txt")) == ["cat", "dog"]
    (tmp_path / "c.json").write_text('["forklift", "pallet"]')
    assert parse_class_list(str(tmp_path / "c.json")) == ["forklift", "pallet"]
    for bad, msg in [("cat,,dog", "empty"), ("", "empty"), ("cat,Cat", "duplicate"), ([], "empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_class_list(bad)
    with pytest.raises(ValueError, match="at most 200"):
        parse_class_list([f"class{i}" for i in range(MAX_CLASSES + 1)])
    with pytest.raises(FileNotFoundError):
        parse_class_list(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        parse_class_list(str(tmp_path / "bad.json"))


def test_user_names_drop_colliding_background_words():
    v = Vocabulary.from_names(["sky", "kite"])
    assert v.names == ("sky", "kite") and "sky" not in v.background and "grass" in v.background
    assert v.prompt_texts[:2] == ("sky", "kite")


def test_unknown_class_suggests():
    with pytest.raises(ValueError, match="did you mean 'sofa'"):
        Vocabulary.named("voc").index("sofaa")
    with pytest.raises(ValueError, match="unknown vocabulary"):
        Vocabulary.named("ade20k")
