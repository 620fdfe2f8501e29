"""Class vocabularies: which texts the patch–text alignment is computed against (EXCEL_SPEC §2.3, §3.2).

The ExCEL alignment compares every patch with a *vocabulary*: all foreground classes of a dataset plus a list of
background words. The class weights (softmax of the CLS similarity) and the class-mean subtraction of the
CLIP-Surgery step depend on the whole vocabulary, while CAMs and labels are kept only for the classes *present*
in an image. A :class:`Vocabulary` holds the foreground display names, the names used inside prompts (the
reference uses CLIP-ES synonyms such as ``"bird avian"``), and the background words.

Label convention everywhere in excelseg: 0 = background, ``i + 1`` = the i-th foreground class of the vocabulary,
255 = ignore.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_CLASSES = 200  # guard against a pasted list of thousands of names (one text forward per name)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Prompt names of the reference (``new_class_names``, after CLIP-ES); order = VOC_CLASSES.
VOC_PROMPT_NAMES = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor screen",
)
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign",
)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# Prompt names of the reference (``new_class_names_coco``, typo "sknowboard" included); order = COCO_CLASSES.
COCO_PROMPT_NAMES = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
    "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite",
    "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)
COCO_BACKGROUND = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))
# the generated scenes of excelseg.synthetic (the shipped synthetic CLIP's own classes; tests/test_synthetic.py
# holds these to the generator's class specs)
SYNTHETIC_CLASSES = (
    "red disc", "blue disc", "green square", "orange square", "yellow triangle", "purple triangle", "red ring",
    "green ring", "blue cross", "yellow cross", "orange star", "purple star", "yellow crescent", "green crescent",
    "red diamond", "blue diamond")
SYNTHETIC_BACKGROUND = ("mottled background", "gradient background", "blotchy background", "wood-grain background")
#: named vocabularies: key → (class names, prompt names, background words)
NAMED_VOCABULARIES = {
    "voc": (VOC_CLASSES, VOC_PROMPT_NAMES, VOC_BACKGROUND),
    "coco": (COCO_CLASSES, COCO_PROMPT_NAMES, COCO_BACKGROUND),
    "synthetic": (SYNTHETIC_CLASSES, SYNTHETIC_CLASSES, SYNTHETIC_BACKGROUND),
}
_NAMED_ALIASES = {"pascal_voc": "voc", "voc2012": "voc", "mscoco": "coco", "coco2014": "coco"}


def normalize_name(name: str) -> str:
    """How class names are compared everywhere: lower case, ``_`` as a space, whitespace collapsed."""
    return " ".join(str(name).lower().replace("_", " ").split())


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a long comma-free class name is not a valid path
        return False


def parse_class_list(spec: str | Sequence[str]) -> list[str]:
    """Class names from a comma list (``"cat,dog"``), a text file (one per line), a JSON list, or a sequence.

    Raises ``ValueError`` for empty or duplicate names and for more than ``MAX_CLASSES`` names.
    """
    if isinstance(spec, str):
        path = Path(spec)
        if spec.lower().endswith((".txt", ".json")) or ("," not in spec and _is_file(path)):
            if not path.is_file():
                raise FileNotFoundError(f"class list file not found: {spec}")
            text = path.read_text(encoding="utf-8")
            names = json.loads(text) if path.suffix.lower() == ".json" else text.splitlines()
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{spec}: expected a JSON list of class-name strings")
            names = [n.strip() for n in names if n.strip() and not n.lstrip().startswith("#")]
        else:
            names = [n.strip() for n in spec.split(",")]
    else:
        names = [str(n).strip() for n in spec]
    if not names or any(not n for n in names):
        raise ValueError(f"empty class name in {spec!r}: give names like 'cat,dog'")
    seen: dict[str, str] = {}
    for n in names:
        if normalize_name(n) in seen:
            raise ValueError(f"duplicate class name {n!r} (also given as {seen[normalize_name(n)]!r})")
        seen[normalize_name(n)] = n
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} class names given; at most {MAX_CLASSES} are supported per run")
    return names


@dataclass(frozen=True)
class Vocabulary:
    """Foreground classes (display + prompt names) and background words.

    ``names[i]`` is the display name of label ``i + 1``; ``prompt_names[i]`` is what goes into the prompt
    template. Texts are ordered foreground first, then background (``prompts``).
    """

    names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    background: tuple[str, ...]
    key: str = "custom"  # "voc", "coco" or "custom"

    def __post_init__(self) -> None:
        if len(self.names) != len(self.prompt_names):
            raise ValueError("names and prompt_names must have the same length")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def prompt_texts(self) -> tuple[str, ...]:
        """Foreground prompt names followed by the background words (length C + M)."""
        return self.prompt_names + self.background

    @classmethod
    def from_names(cls, names: Sequence[str], background: Sequence[str] | None = VOC_BACKGROUND) -> Vocabulary:
        """A vocabulary of user class names, used as-is in prompts.

        Background words equal to a class name are dropped so a class such as ``"sky"`` is not also background.
        """
        names = tuple(parse_class_list(list(names)))
        taken = {normalize_name(n) for n in names}
        bg = tuple(w for w in (background or ()) if normalize_name(w) not in taken)
        return cls(names, names, bg)

    @classmethod
    def named(cls, key: str) -> Vocabulary:
        key = _NAMED_ALIASES.get(key.lower(), key.lower())
        if key not in NAMED_VOCABULARIES:
            raise ValueError(f"unknown vocabulary {key!r}: use {', '.join(map(repr, NAMED_VOCABULARIES))}, a comma "
                             "list or a file")
        return cls(*NAMED_VOCABULARIES[key], key)

    @classmethod
    def from_spec(cls, spec: str | Sequence[str] | Vocabulary) -> Vocabulary:
        """``"voc"``, ``"coco"``, ``"synthetic"``, a comma list, a ``.txt``/``.json`` file of names, or a sequence of
        names."""
        if isinstance(spec, Vocabulary):
            return spec
        if isinstance(spec, str) and (spec.lower() in NAMED_VOCABULARIES or spec.lower() in _NAMED_ALIASES):
            return cls.named(spec)
        return cls.from_names(parse_class_list(spec))

    def index(self, name: str) -> int:
        """0-based foreground index of ``name`` (display or prompt name, case-insensitive)."""
        target = normalize_name(name)
        for i, (n, p) in enumerate(zip(self.names, self.prompt_names)):
            if target in (normalize_name(n), normalize_name(p)):
                return i
        close = difflib.get_close_matches(target, [normalize_name(n) for n in self.names], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"class {name!r} is not in the {self.key} vocabulary{hint}")

    def indices(self, names: Sequence[str]) -> list[int]:
        return [self.index(n) for n in parse_class_list(list(names))]


def dataset_vocabulary(class_names: Sequence[str], kind: str) -> Vocabulary:
    """The vocabulary for a dataset's classes: the named vocabulary (its prompt names and background words) of the
    dataset's ``kind``, or ``voc`` / ``coco``, when the classes are exactly that vocabulary's, in order (e.g.
    ``synthetic`` scenes: their backgrounds as background words); else the names themselves with the paper's
    background words."""
    for key in dict.fromkeys((kind, "voc", "coco")):
        try:
            named = Vocabulary.named(key)
        except ValueError:  # a kind without a named vocabulary (folder)
            continue
        if [normalize_name(n) for n in class_names] == [normalize_name(n) for n in named.names]:
            return named
    return Vocabulary.from_names(list(class_names))
