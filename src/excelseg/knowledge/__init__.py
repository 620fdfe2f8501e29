"""Knowledge bases: short visual descriptions of each class, the input of the TSE attribute bank (paper §3.2).

Shipped files: ``voc.json`` (the 20 PASCAL VOC classes) and ``coco.json`` (the 80 COCO classes), written for
excelseg: 20 sentences per class about appearance, parts, colour, shape, material and typical surroundings,
and no sentence names another class of the same dataset. Keys are the display names of
:data:`excelseg.vocab.VOC_CLASSES` / :data:`~excelseg.vocab.COCO_CLASSES`, in that order.

File format (UTF-8 JSON)::

    {"format": "excelseg-knowledge/1",
     "classes": {
        "cat": {"descriptions": ["a small furry animal with pointed ears", "..."],
                "synonyms": ["kitty"]},
        "...": {...}}}

``descriptions`` is a non-empty list of non-empty strings; ``synonyms`` (optional) lists other names of the
class for people and tools — the bank builder does not use them. Class order is kept (it is the row order of
the bank's class→cluster flags). The reference's plain format, ``{"class name": ["sentence", ...], ...}``, is
accepted as well. ``excelseg describe`` writes this format from an LLM; ``excelseg bank build --knowledge``
reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KNOWLEDGE_FORMAT = "excelseg-knowledge/1"
SHIPPED = {"voc": "voc.json", "coco": "coco.json", "synthetic": "synthetic.json"}
#: attributes B of each shipped base's TSE bank: the paper's (EXCEL_SPEC §2.1) and 3 per synthetic class
DEFAULT_CLUSTERS = {"voc": 112, "coco": 224, "synthetic": 48}
_ALIASES = {"pascal_voc": "voc", "voc2012": "voc", "mscoco": "coco", "coco2014": "coco"}

__all__ = ["DEFAULT_CLUSTERS", "KNOWLEDGE_FORMAT", "SHIPPED", "KnowledgeError", "knowledge_entries", "knowledge_path", "load_knowledge",
           "parse_knowledge"]


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used: not UTF-8, invalid JSON, entries of the wrong type or empty."""


def knowledge_path(name: str) -> Path:
    """Path of a shipped knowledge base: ``"voc"``, ``"coco"`` or ``"synthetic"``."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SHIPPED:
        raise ValueError(f"unknown knowledge base {name!r}: the shipped ones are {', '.join(SHIPPED)}")
    return Path(__file__).resolve().parent / SHIPPED[key]


def _sentences(value: object, cls: str, where: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise KnowledgeError(f"{where}: class {cls!r}: descriptions must be a list of strings, "
                             f"got {type(value).__name__}")
    if not value and not allow_empty:
        raise KnowledgeError(f"{where}: class {cls!r} has no descriptions")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise KnowledgeError(f"{where}: class {cls!r}: description {i + 1} is a {type(s).__name__}, "
                                 f"not a string")
        if not s.strip():
            raise KnowledgeError(f"{where}: class {cls!r}: description {i + 1} is empty")
        out.append(" ".join(s.split()))
    return out


def knowledge_entries(obj: object, where: str = "knowledge base", *, allow_empty: bool = False) -> dict:
    """The ``excelseg-knowledge/1`` dict of a parsed JSON object of either accepted format (module docstring):
    every class entry gets ``descriptions`` (whitespace collapsed) and ``synonyms``; other fields are kept.
    ``allow_empty``: classes without descriptions yet are accepted (a knowledge base being written)."""
    if not isinstance(obj, dict):
        raise KnowledgeError(f"{where}: expected a JSON object of classes, got {type(obj).__name__}")
    if "format" in obj:
        if obj["format"] != KNOWLEDGE_FORMAT:
            raise KnowledgeError(f"{where}: unknown format {obj['format']!r} (expected {KNOWLEDGE_FORMAT!r})")
        classes = obj.get("classes")
        if not isinstance(classes, dict):
            raise KnowledgeError(f"{where}: 'classes' must be an object of class name -> entry")
        kb = {**obj, "classes": {}}
        for cls, entry in classes.items():
            if not isinstance(entry, dict):
                raise KnowledgeError(f"{where}: class {cls!r} must be an object with 'descriptions'")
            syn = entry.get("synonyms", [])
            if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
                raise KnowledgeError(f"{where}: class {cls!r}: synonyms must be a list of strings")
            descriptions = entry.get("descriptions", [] if allow_empty else None)
            kb["classes"][cls] = {**entry, "descriptions": _sentences(descriptions, cls, where, allow_empty),
                                  "synonyms": list(syn)}
    else:
        kb = {"format": KNOWLEDGE_FORMAT,
              "classes": {cls: {"descriptions": _sentences(v, cls, where, allow_empty), "synonyms": []}
                          for cls, v in obj.items()}}
    if not kb["classes"] and not allow_empty:
        raise KnowledgeError(f"{where}: no classes")
    for cls in kb["classes"]:
        if not cls.strip():
            raise KnowledgeError(f"{where}: empty class name")
    return kb


def parse_knowledge(obj: object, where: str = "knowledge base") -> dict[str, list[str]]:
    """Class name → descriptions from a parsed JSON object of either accepted format (module docstring)."""
    return {cls: e["descriptions"] for cls, e in knowledge_entries(obj, where)["classes"].items()}


def load_knowledge(path_or_name: str | os.PathLike) -> dict[str, list[str]]:
    """Class name → descriptions from ``"voc"``, ``"coco"``, ``"synthetic"`` (the shipped files) or a JSON file.

    Raises:
        FileNotFoundError: no such file (and not a shipped name).
        KnowledgeError (a ValueError): not UTF-8, invalid JSON (with line and column), or a class whose
            descriptions are not a non-empty list of non-empty strings (naming the class).
    """
    spec = os.fspath(path_or_name)
    path = Path(spec).expanduser()
    if not path.is_file():
        key = _ALIASES.get(spec.lower(), spec.lower())
        if key in SHIPPED:
            path = knowledge_path(key)
        elif path.exists():
            raise ValueError(f"knowledge base {spec} is not a file")
        else:
            raise FileNotFoundError(f"knowledge base {spec!r} not found: give 'voc', 'coco', 'synthetic' or a JSON "
                                    "file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise KnowledgeError(f"{path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} on line {line}); "
                         f"save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KnowledgeError(f"{path}: invalid JSON on line {exc.lineno}, column {exc.colno}: {exc.msg}") \
            from None
    return parse_knowledge(obj, str(path))
