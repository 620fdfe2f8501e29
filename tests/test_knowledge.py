"""Shipped knowledge bases (voc.json, coco.json) and the knowledge loader."""

from __future__ import annotations

import json
import re

import pytest

from excelseg.knowledge import KNOWLEDGE_FORMAT, knowledge_path, load_knowledge, parse_knowledge
from excelseg.vocab import COCO_CLASSES, VOC_CLASSES

# Every way a sentence could name a class: the display name plus common spellings, synonyms and the joined or
# spaced forms of multi-word names. Plurals are added by `_forms`. Written independently of the library.
VOC_NAMES = {
    "aeroplane": ["aeroplane", "airplane", "plane"],
    "bicycle": ["bicycle", "bike"],
    "bird": ["bird"],
    "boat": ["boat"],
    "bottle": ["bottle"],
    "bus": ["bus"],
    "car": ["car"],
    "cat": ["cat"],
    "chair": ["chair"],
    "cow": ["cow", "cattle"],
    "diningtable": ["diningtable", "dining table", "table"],
    "dog": ["dog"],
    "horse": ["horse"],
    "motorbike": ["motorbike", "motor bike", "motorcycle"],
    "person": ["person", "people", "human"],
    "pottedplant": ["pottedplant", "potted plant", "plant", "houseplant"],
    "sheep": ["sheep"],
    "sofa": ["sofa", "couch"],
    "train": ["train"],
    "tvmonitor": ["tvmonitor", "tv monitor", "tv", "television", "monitor"],
}
COCO_NAMES = {
    "person": ["person", "people", "human"],
    "bicycle": ["bicycle", "bike"],
    "car": ["car"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike"],
    "airplane": ["airplane", "aeroplane", "plane"],
    "bus": ["bus"],
    "train": ["train"],
    "truck": ["truck", "lorry"],
    "boat": ["boat"],
    "traffic light": ["traffic light", "trafficlight"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign", "stopsign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    "bird": ["bird"],
    "cat": ["cat"],
    "dog": ["dog"],
    "horse": ["horse"],
    "sheep": ["sheep"],
    "cow": ["cow", "cattle"],
    "elephant": ["elephant"],
    "bear": ["bear"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "back pack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "hand bag", "purse"],
    "tie": ["tie", "necktie"],
    "suitcase": ["suitcase"],
    "frisbee": ["frisbee"],
    "skis": ["skis", "ski"],
    "snowboard": ["snowboard"],
    "sports ball": ["sports ball", "ball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "glove", "mitt"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard"],
    "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "wineglass"],
    "cup": ["cup"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich"],
    "orange": ["orange"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake"],
    "chair": ["chair"],
    "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "pottedplant", "plant", "houseplant"],
    "bed": ["bed"],
    "dining table": ["dining table", "diningtable", "table"],
    "toilet": ["toilet"],
    "tv": ["tv", "tvmonitor", "tv monitor", "television", "monitor"],
    "laptop": ["laptop"],
    "mouse": ["mouse"],
    "remote": ["remote", "remote control"],
    "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "cellphone", "phone", "smartphone", "mobile phone"],
    "microwave": ["microwave"],
    "oven": ["oven"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors", "scissor"],
    "teddy bear": ["teddy bear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "hairdrier", "blow dryer", "blow drier"],
    "toothbrush": ["toothbrush"],
}
IRREGULAR_PLURALS = {"person": "persons", "knife": "knives", "mouse": "mice", "sheep": "sheep",
                     "skis": "skis", "scissors": "scissors", "people": "people", "cattle": "cattle"}


def _forms(name: str) -> set[str]:
    """The name and its plural (last word pluralised)."""
    *head, last = name.split()
    plurals = {IRREGULAR_PLURALS.get(last, "")}
    if last.endswith(("s", "x", "ch", "sh")):
        plurals.add(last + "es")
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        plurals.add(last[:-1] + "ies")
    else:
        plurals.add(last + "s")
    return {name} | {" ".join([*head, p]) for p in plurals if p}


def _pattern(names: list[str]) -> re.Pattern:
    """Whole-word (letters on neither side; a hyphen or space counts as a boundary) match of any form."""
    forms = sorted({f for n in names for f in _forms(n)}, key=len, reverse=True)
    alts = [r"[\s-]+".join(re.escape(w) for w in f.split()) for f in forms]
    return re.compile(r"(?<![a-z])(?:" + "|".join(alts) + r")(?![a-z])", re.IGNORECASE)


def cross_mentions(knowledge: dict[str, list[str]],
                   names: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(class, other class named, sentence) for every sentence that names another class of the dataset.

    The sentence's own class names are blanked first, so "teddy bear" does not count as naming "bear".
    """
    patterns = {cls: _pattern(aliases) for cls, aliases in names.items()}
    found = []
    for cls, sentences in knowledge.items():
        for s in sentences:
            text = patterns[cls].sub(" # ", s)
            found += [(cls, other, s) for other, pat in patterns.items() if other != cls and pat.search(text)]
    return found


@pytest.mark.parametrize("name, classes, names", [("voc", VOC_CLASSES, VOC_NAMES),
                                                  ("coco", COCO_CLASSES, COCO_NAMES)])
def test_shipped_knowledge(name, classes, names):
    raw = json.loads(knowledge_path(name).read_text(encoding="utf-8"))
    assert raw["format"] == KNOWLEDGE_FORMAT
    assert list(raw["classes"]) == list(classes)
    kb = load_knowledge(name)
    assert list(kb) == list(classes) and set(names) == set(classes)
    for cls, sentences in kb.items():
        assert len(sentences) == 20, cls
        assert all(s.strip() == s and s for s in sentences), cls
        assert len({s.lower() for s in sentences}) == 20, f"{cls}: duplicate sentences"
        assert sum(s.lower().startswith(cls.lower()) for s in sentences) <= 2, cls
        assert all(3 <= len(s.split()) <= 30 for s in sentences), cls
    bad = cross_mentions(kb, names)
    assert not bad, "\n".join(f"{c}: names {o}: {s!r}" for c, o, s in bad[:20])


def test_cross_mention_check_catches_plurals_aliases_and_multiword():
    names = {"dining table": ["dining table", "diningtable", "table"], "chair": ["chair"],
             "teddy bear": ["teddy bear", "teddy"], "bear": ["bear"], "mouse": ["mouse"],
             "tv": ["tv", "monitor"]}
    kb = {"dining table": ["surrounded by Chairs", "a wooden top", "next to a Dining-Table"],
          "chair": ["pulled up to the diningtable", "a seat", "beside the TV"],
          "teddy bear": ["a soft teddy bear toy"],  # own name containing another class is fine
          "bear": ["chasing mice", "a bearded look"],
          "mouse": [], "tv": []}
    found = {(c, o) for c, o, _ in cross_mentions(kb, names)}
    assert found == {("dining table", "chair"), ("chair", "dining table"), ("chair", "tv"), ("bear", "mouse")}


def test_load_by_name_and_path(tmp_path):
    assert knowledge_path("voc").is_file() and knowledge_path("COCO").is_file()
    assert load_knowledge("voc") == load_knowledge(knowledge_path("voc"))
    with pytest.raises(ValueError, match="unknown knowledge base"):
        knowledge_path("ade20k")
    with pytest.raises(FileNotFoundError, match="'voc', 'coco', 'synthetic' or a JSON"):
        load_knowledge(tmp_path / "missing.json")


def test_reference_plain_format_accepted(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"cat": ["a furry animal", "  whiskers   and a tail "],
                                "dog": ["barks loudly"]}))
    assert load_knowledge(path) == {"cat": ["a furry animal", "whiskers and a tail"], "dog": ["barks loudly"]}


def test_shipped_format_with_synonyms(tmp_path):
    path = tmp_path / "kb.json"
    path.write_text(json.dumps({"format": KNOWLEDGE_FORMAT, "classes": {
        "forklift": {"descriptions": ["a small yellow vehicle with two prongs"], "synonyms": ["lift truck"]},
        "crane": {"descriptions": ["a tall lattice tower"]}}}))
    assert load_knowledge(path) == {"forklift": ["a small yellow vehicle with two prongs"],
                                    "crane": ["a tall lattice tower"]}


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "cat": ["a furry animal",\n  "dog": ["barks"]\n}\n')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON on line 3"):
        load_knowledge(path)


def test_non_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"café": ["a small room"]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 .*line 1"):
        load_knowledge(path)


@pytest.mark.parametrize("obj, match", [
    ({"cat": "a furry animal"}, "class 'cat': descriptions must be a list"),
    ({"cat": ["ok", 3]}, "class 'cat': description 2 is a int"),
    ({"cat": ["ok", "   "]}, "class 'cat': description 2 is empty"),
    ({"cat": []}, "class 'cat' has no descriptions"),
    ({"format": KNOWLEDGE_FORMAT, "classes": {"cat": {"descriptions": None}}},
     "class 'cat': descriptions must"),
    ({"format": KNOWLEDGE_FORMAT, "classes": {"cat": ["x"]}}, "class 'cat' must be an object"),
    ({"format": KNOWLEDGE_FORMAT, "classes": {"cat": {"descriptions": ["x"], "synonyms": "kitty"}}},
     "class 'cat': synonyms"),
    ({"format": "other/2", "classes": {}}, "unknown format"),
    (["a", "b"], "expected a JSON object"),
    ({}, "no classes"),
])
def test_wrong_types_name_the_class(tmp_path, obj, match):
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=match):
        load_knowledge(path)
    with pytest.raises(ValueError, match=match):
        parse_knowledge(obj)
