"""Caption variety and hard negatives for contrastive training of the synthetic CLIP (``excelseg train-clip``).

A scene's own caption (:attr:`Scene.caption`, drawn by the generator) always spells out every attribute
("a large red disc with stripes ..."), while the training-free pipeline asks the model about bare class names
("a photo of a red disc."). :class:`CaptionSampler` re-words a scene from its placed objects with a separate
random stream (the scenes themselves, and so every held-out set, stay exactly as generated):

==============  ===================================================================================
``full``        the generator's caption (all attributes, the background)
``names``       class names only, in random order: "a photo of a red disc and a blue cross."
``count``       how many objects, then their names: "an image of two shapes: a blue cross and a red disc"
``relation``    the spatial relation of two objects (from their centres): "a red disc left of a blue cross"
``attributes``  names with one extra attribute each: "a picture of a striped red disc and a small blue cross"
==============  ===================================================================================

Every wording names every object of the scene, so "same set of classes" stays the positive relation of the
contrastive targets. A *hard negative* of a scene is its caption (same wording) with one object's class swapped
for an absent class that shares that object's colour or shape — the confusions the CAMs of a weak model make
(a ring labelled "blue diamond"): the image must prefer its own caption to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scenes import CLASSES, PATTERN_ADJECTIVE, ClassSpec, Scene, join_phrases, scene_caption

__all__ = ["CAPTION_MODES", "CAPTION_STYLES", "CaptionSampler"]

CAPTION_STYLES: tuple[str, ...] = ("full", "names", "count", "relation", "attributes")
#: ``full``: always the generator's caption (the original training data); ``mixed``: a style drawn uniformly
#: from :data:`CAPTION_STYLES` per pair (``relation`` only for scenes of two or more objects).
CAPTION_MODES: tuple[str, ...] = ("full", "mixed")

_PREFIXES = ("a photo of", "an image of", "a picture of", "a rendering of")
_COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes", 4: "four shapes", 5: "five shapes"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre ``a`` lies relative to centre ``b`` (image coordinates, y down), by the larger offset."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


class CaptionSampler:
    """Draws a training caption (and optionally a hard negative) for a generated scene.

    Args:
        mode: ``"full"`` (the generator's caption) or ``"mixed"`` (see the module table).
        classes: the generator's class table (the scene's ``class_index`` values index it).
    """

    def __init__(self, mode: str = "mixed", classes: Sequence[ClassSpec] = CLASSES):
        if mode not in CAPTION_MODES:
            raise ValueError(f"caption mode must be one of {', '.join(CAPTION_MODES)}, got {mode!r}")
        self.mode = mode
        self.classes = tuple(classes)

    def _style(self, scene: Scene, rng: np.random.Generator) -> str:
        if self.mode == "full":
            return "full"
        styles = [s for s in CAPTION_STYLES if s != "relation" or len(scene.objects) >= 2]
        return styles[int(rng.integers(len(styles)))]

    def _phrase(self, spec: ClassSpec, style: str, rng: np.random.Generator) -> str:
        if style == "attributes":
            extra = (spec.size, PATTERN_ADJECTIVE[spec.pattern])[int(rng.integers(2))]
            return _article(f"{extra} {spec.name}")
        return _article(spec.name)

    def _render(self, scene: Scene, classes: Sequence[int], style: str, rng: np.random.Generator) -> str:
        """One caption naming the objects ``classes`` (class indices, in the scene's drawing order)."""
        prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
        specs = [self.classes[c] for c in classes]
        if style == "full":
            return scene_caption(prefix, specs, scene.background)
        order = [int(i) for i in rng.permutation(len(specs))]
        phrases = [self._phrase(specs[i], style, rng) for i in order]
        if style == "count":
            return f"{prefix} {_COUNT_WORDS.get(len(specs), f'{len(specs)} shapes')}: {join_phrases(phrases)}"
        if style == "relation":
            i, j = order[0], order[1]
            rel = _relation(scene.objects[i].centre, scene.objects[j].centre)
            rest = [phrases[k] for k in range(2, len(order))]
            text = f"{prefix} {phrases[0]} {rel} {phrases[1]}"
            return text + (f" and {join_phrases(rest)}" if rest else "")
        return f"{prefix} {join_phrases(phrases)}."

    def caption(self, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
        """(caption, style) of ``scene``; ``full`` mode returns :attr:`Scene.caption` itself."""
        style = self._style(scene, rng)
        if style == "full" and self.mode == "full":
            return scene.caption, style
        return self._render(scene, [o.class_index for o in scene.objects], style, rng), style

    def hard_negative(self, scene: Scene, style: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        """A caption in ``style`` with one object swapped for an absent class sharing its colour or shape.

        Returns the caption and its multi-hot class vector ``(C,)`` float32 (to keep it from counting as a
        negative for another image that really holds that set of classes).
        """
        present = [o.class_index for o in scene.objects]
        k = int(rng.integers(len(present)))
        spec = self.classes[present[k]]
        near = [c for c, s in enumerate(self.classes)
                if c not in present and (s.colour == spec.colour or s.shape == spec.shape)]
        if not near:
            near = [c for c in range(len(self.classes)) if c not in present]
        swapped = list(present)
        swapped[k] = near[int(rng.integers(len(near)))]
        labels = np.zeros(len(self.classes), dtype=np.float32)
        labels[swapped] = 1.0
        return self._render(scene, swapped, style, rng), labels
