"""The synthetic world's classes: attribute values, the 16 class specs, the shape geometry and the words that
describe them (captions, knowledge). :mod:`excelseg.synthetic.scenes` draws scenes of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# attributes and classes

#: Named object colours (RGB). Each object's colour is this value with a random brightness and a small jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 40),
    "orange": (240, 130, 20),
    "yellow": (240, 215, 35),
    "green": (40, 155, 60),
    "blue": (35, 85, 215),
    "purple": (130, 50, 175),
}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
SIZES: tuple[str, ...] = ("small", "large")
#: Radius range of each size, as a fraction of the image side. Every shape fits in the circle of that radius.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.085, 0.125), "large": (0.17, 0.25)}
BACKGROUNDS: tuple[str, ...] = ("mottled", "gradient", "blotchy", "wood-grain")

MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_IMAGE_FRACTION = 0.0025
MAX_ATTEMPTS = 25
OVERLAP_PROBABILITY = 0.5

_TINT = 0.55  # pattern colour: the object colour moved this far towards white
_BACKGROUND_MIN_DISTANCE = 80.0  # RGB distance of every background colour from every object colour
_BACKGROUND_MIN_TINT_DISTANCE = 50.0  # ... and from every pattern tint


@dataclass(frozen=True)
class ClassSpec:
    """One object class: a name and its four attributes (values of :data:`SHAPES`, :data:`COLOURS`, ...)."""

    name: str
    shape: str
    colour: str
    pattern: str
    size: str

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.pattern, self.size)


def _spec(shape: str, colour: str, pattern: str, size: str) -> ClassSpec:
    return ClassSpec(f"{colour} {shape}", shape, colour, pattern, size)


#: The 16 default classes. (colour, shape) is unique — it is the name; every attribute value is used by ≥ 2.
CLASSES: tuple[ClassSpec, ...] = (
    _spec("disc", "red", "stripes", "large"),
    _spec("disc", "blue", "dots", "small"),
    _spec("square", "green", "checker", "large"),
    _spec("square", "orange", "solid", "small"),
    _spec("triangle", "yellow", "stripes", "small"),
    _spec("triangle", "purple", "checker", "large"),
    _spec("ring", "red", "dots", "large"),
    _spec("ring", "green", "solid", "small"),
    _spec("cross", "blue", "checker", "small"),
    _spec("cross", "yellow", "solid", "large"),
    _spec("star", "orange", "stripes", "large"),
    _spec("star", "purple", "dots", "small"),
    _spec("crescent", "yellow", "dots", "large"),
    _spec("crescent", "green", "stripes", "small"),
    _spec("diamond", "red", "checker", "small"),
    _spec("diamond", "blue", "solid", "large"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)

# --------------------------------------------------------------------------------------------------------------
# shapes: implicit tests on coordinates normalised by the radius (every shape lies inside the unit circle).
# Only +, *, abs and comparisons: the decision at a pixel does not depend on the array it is computed in.

_F = np.float32
_SQRT3_2 = _F(math.sqrt(3.0) / 2.0)
_HALF = _F(0.5)
# pentagram: the five lines joining every second tip (tips on the unit circle); a point is inside the filled
# star when it is on the centre's side of at least four of them (all five: the inner pentagon)
_STAR_ANGLES = [-math.pi / 2 + 2 * math.pi * (k + 0.5) / 5 for k in range(5)]
_STAR_NORMALS = [(_F(math.cos(a)), _F(math.sin(a))) for a in _STAR_ANGLES]
_STAR_D = _F(math.cos(2 * math.pi / 5))


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= _F(1.0)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= _F(0.7)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # equilateral, circumradius 1, apex towards −v
    a = _SQRT3_2 * u
    b = _HALF * v
    return (v <= _HALF) & (a - b <= _HALF) & (-a - b <= _HALF)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= _F(1.0)) & (r2 >= _F(0.55 * 0.55))


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    arm, length = _F(0.28), _F(0.95)
    return ((au <= arm) & (av <= length)) | ((av <= arm) & (au <= length))


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    count = np.zeros(u.shape, dtype=np.uint8)
    for nx, ny in _STAR_NORMALS:
        count += nx * u + ny * v <= _STAR_D
    return count >= 4


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    w = u - _F(0.45)
    return (u * u + v * v <= _F(1.0)) & (w * w + v * v >= _F(0.8 * 0.8))


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:  # rhombus, long axis v
    return np.abs(u) * _F(1.0 / 0.55) + np.abs(v) <= _F(1.0)


_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "ring": _ring,
    "cross": _cross,
    "star": _star,
    "crescent": _crescent,
    "diamond": _diamond,
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_TESTS)


def shape_test(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean array: which points ``(u, v)`` (in units of the object radius, object frame) the shape covers."""
    return _SHAPE_TESTS[shape](np.asarray(u, dtype=np.float32), np.asarray(v, dtype=np.float32))


def _shape_areas(n: int = 400) -> dict[str, float]:
    t = (np.arange(n, dtype=np.float32) + _F(0.5)) * _F(2.0 / n) - _F(1.0)
    u, v = np.meshgrid(t, t)
    return {s: float(fn(u, v).mean()) * 4.0 for s, fn in _SHAPE_TESTS.items()}


#: Area of each shape in units of radius² (a disc: π).
SHAPE_AREA: dict[str, float] = _shape_areas()

# --------------------------------------------------------------------------------------------------------------
# words

_PATTERN_PHRASE = {
    "solid": "in solid colour",
    "stripes": "with stripes",
    "dots": "with dots",
    "checker": "with a checker pattern",
}
PATTERN_ADJECTIVE = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
_BACKGROUND_PHRASE = {
    "mottled": "a mottled background",
    "gradient": "a smooth gradient background",
    "blotchy": "a softly blotched background",
    "wood-grain": "a wood-grain background",
}
_CAPTION_PREFIXES = ("a photo of", "an image of", "a picture of", "a rendering of")


def caption_phrase(spec: ClassSpec) -> str:
    """How captions describe one object of a class: ``"a large red disc with stripes"``."""
    return f"a {spec.size} {spec.colour} {spec.shape} {_PATTERN_PHRASE[spec.pattern]}"


def scene_caption(prefix: str, specs: Sequence[ClassSpec], background: str) -> str:
    """The generator's caption: ``"a photo of a large red disc with stripes and ... on a mottled background"``."""
    return f"{prefix} {join_phrases([caption_phrase(s) for s in specs])} on {_BACKGROUND_PHRASE[background]}"


def join_phrases(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
