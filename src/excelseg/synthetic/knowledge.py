"""The synthetic classes' knowledge base (``excelseg-knowledge/1``), from the sentence tables in ``sentences.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from ..knowledge import DEFAULT_CLUSTERS, KNOWLEDGE_FORMAT
from .scenes import CLASSES, PATTERN_ADJECTIVE, ClassSpec, _check_classes, caption_phrase


@lru_cache(maxsize=1)
def sentence_tables() -> dict[str, Any]:
    """``{"shape": {value: [sentences]}, "colour": …, "pattern": …, "size": …, "shared": [sentences]}``."""
    text = resources.files(__package__).joinpath("sentences.json").read_text(encoding="utf-8")
    return json.loads(text)


def _class_sentences(spec: ClassSpec) -> list[str]:
    s = sentence_tables()
    sentences = (
        s["shape"][spec.shape]
        + s["colour"][spec.colour]
        + s["pattern"][spec.pattern]
        + s["size"][spec.size]
        + s["shared"]
        + [caption_phrase(spec),
           f"a {PATTERN_ADJECTIVE[spec.pattern]} {spec.colour} shape in the form of a {spec.shape}"]
    )
    assert len(sentences) == 20 and len(set(sentences)) == 20
    return sentences


def knowledge_base(classes: Sequence[ClassSpec] = CLASSES) -> dict[str, Any]:
    """The knowledge base of ``classes`` in the ``excelseg-knowledge/1`` format (20 sentences per class).

    Sentences describe one attribute each (5 shape, 3 colour, 4 pattern, 3 size), 3 are common to every class
    (edges, backdrop, occlusion) and 2 combine all attributes. Attribute sentences are shared
    word for word by every class with that attribute value; no sentence names another class.
    """
    classes = _check_classes(classes)
    return {
        "format": KNOWLEDGE_FORMAT,
        "classes": {c.name: {"descriptions": _class_sentences(c), "synonyms": []} for c in classes},
    }


#: TSE attributes B for the 16 synthetic classes (3 per class; the paper's VOC B = 112 for 20 classes ≈ 5.6);
#: the shipped ``knowledge/synthetic.json`` is :func:`knowledge_base` written out (tests/test_synthetic.py).
SYNTHETIC_CLUSTERS = DEFAULT_CLUSTERS["synthetic"]


def synthetic_bank(clip: Any, cache_dir: str | None = None, *, template: str = "a photo of a {}."):
    """The TSE attribute bank (paper §3.1, Eq. 3–4) of :func:`knowledge_base` for ``clip`` with
    :data:`SYNTHETIC_CLUSTERS` attributes; cached like every bank (``excelseg.bank.bank_for``)."""
    from ..bank import bank_for
    from ..knowledge import parse_knowledge

    return bank_for(clip, parse_knowledge(knowledge_base(), "synthetic knowledge"), SYNTHETIC_CLUSTERS,
                    prefix=template, cache_dir=cache_dir, progress=False)
