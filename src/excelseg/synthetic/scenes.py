"""Procedural scenes of flat coloured shapes: images, exact masks, image labels, captions and a knowledge base.

A controlled stand-in for PASCAL VOC / COCO on which a small CLIP can be trained and the ExCEL pipeline tested
end to end. Every class is a combination of four attributes, and every attribute value is shared by at least two
classes — the cross-class attribute sharing the paper's text semantic enrichment (TSE) exploits:

=========  ===========================================================================
shape      disc, square, triangle, ring, cross, star, crescent, diamond (2 classes each)
colour     red, orange, yellow, green, blue, purple (2–3 classes each), jittered per object
pattern    solid, stripes, dots, checker (4 classes each), drawn in a paler tint of the colour
size       small (radius 8.5–12.5 % of the image side), large (17–25 %) (8 classes each)
=========  ===========================================================================

A class is named by its colour and shape ("red disc"; the pair is unique), its pattern and size are the
extra attributes the knowledge base and the captions spell out (:data:`CLASSES`).

Scenes
    ``SceneGenerator(size, num_objects, classes, seed).scene(index)`` draws 1–3 objects of distinct classes on
    one of four textured backgrounds (mottled value noise, a smooth gradient, soft blotches, wood grain) whose
    colours are kept away from the objects' colours. Each object gets a random rotation, radius (from its
    class's size range) and position; half of the later objects are put next to an earlier one so that
    occlusion is common. Objects are drawn in order, later over earlier. Everything is a deterministic function
    of ``(seed, index)`` alone (a ``numpy.random.Generator`` seeded with ``SeedSequence([seed, index])``), so
    scenes can be generated in any order, in parallel, or one at a time.

Masks
    ``mask[y, x]`` is ``1 + class`` of the top-most object whose shape contains the pixel centre
    ``(x + 0.5, y + 0.5)``, 0 where none does; 255 is never used. Images are not anti-aliased: a pixel shows an
    object's colour exactly where the mask has that object, so image and mask agree pixel for pixel. Every
    object of a scene stays visible: after occlusion and cropping by the frame it keeps at least
    :data:`MIN_VISIBLE_FRACTION` of its full area and at least :data:`MIN_VISIBLE_IMAGE_FRACTION` of the image
    (a pose breaking either rule is drawn again, up to :data:`MAX_ATTEMPTS` times, then the object is left out).
    ``labels`` is read off the mask, so it lists exactly the classes with at least one pixel.

Rendering is vectorised numpy: per object, implicit shape tests on rotated pixel-centre coordinates inside the
object's bounding square, pattern functions on the same coordinates; backgrounds from separable bilinear value
noise (small matrix products), separable Gaussians and a sine.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .classes import (
    _BACKGROUND_MIN_DISTANCE,
    _BACKGROUND_MIN_TINT_DISTANCE,
    _CAPTION_PREFIXES,
    _F,
    _SHAPE_TESTS,
    _TINT,
    BACKGROUNDS,
    CLASS_NAMES,
    CLASSES,
    COLOURS,
    MAX_ATTEMPTS,
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_IMAGE_FRACTION,
    OVERLAP_PROBABILITY,
    PATTERN_ADJECTIVE,
    PATTERNS,
    SHAPE_AREA,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    ClassSpec,
    caption_phrase,
    join_phrases,
    scene_caption,
    shape_test,
)

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "CLASS_NAMES",
    "COLOURS",
    "MAX_ATTEMPTS",
    "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_IMAGE_FRACTION",
    "PATTERNS",
    "PATTERN_ADJECTIVE",
    "SHAPES",
    "SIZES",
    "ClassSpec",
    "PlacedObject",
    "Scene",
    "SceneGenerator",
    "caption_phrase",
    "join_phrases",
    "scene_caption",
    "shape_test",
]

# --------------------------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class PlacedObject:
    """One object of a scene, in drawing order. Coordinates in pixels, pixel ``(x, y)`` has centre (x+.5, y+.5).

    ``box`` is the visible extent ``(x0, y0, x1, y1)``, end exclusive; ``visible_pixels`` its mask pixel count.
    """

    class_index: int
    shape: str
    centre: tuple[float, float]
    radius: float
    angle: float
    colour: tuple[int, int, int]
    visible_pixels: int
    box: tuple[int, int, int, int]

    def coverage(self, size: int) -> np.ndarray:
        """``(size, size)`` bool: the pixels whose centre the shape contains, ignoring every other object."""
        xs = _pixel_centres(size)
        u, v = _local_coords(xs, xs, self.centre, self.angle)
        inv_r = _F(1.0 / self.radius)
        return _SHAPE_TESTS[self.shape](u * inv_r, v * inv_r)


@dataclass(frozen=True, eq=False)
class Scene:
    """A generated scene. ``labels``: sorted class indices present in ``mask``; ``boxes`` per object."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 = background, 1 + class index elsewhere
    labels: tuple[int, ...]
    caption: str
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    objects: tuple[PlacedObject, ...] = ()
    background: str = ""
    index: int = 0
    seed: int = 0
    names: tuple[str, ...] = field(default=(), repr=False)  # names of ``labels``


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    xs = np.arange(size, dtype=np.float32) + _F(0.5)
    xs.setflags(write=False)
    return xs


def _local_coords(
    xs: np.ndarray, ys: np.ndarray, centre: tuple[float, float], angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from ``centre`` rotated into the object's frame: ``(len(ys), len(xs))`` float32 each."""
    c, s = _F(math.cos(angle)), _F(math.sin(angle))
    dx = xs - _F(centre[0])
    dy = ys - _F(centre[1])
    u = (dx * c)[None, :] + (dy * s)[:, None]
    v = (dy * c)[:, None] - (dx * s)[None, :]
    return u, v


@lru_cache(maxsize=64)
def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """``(size, cells + 1)``: smooth-step interpolation of a lattice of ``cells + 1`` knots onto ``size`` pixels."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (cells / size)
    i0 = np.minimum(np.floor(pos).astype(np.int64), cells - 1)
    t = pos - i0
    t = t * t * (3.0 - 2.0 * t)
    m = np.zeros((size, cells + 1), dtype=np.float32)
    rows = np.arange(size)
    m[rows, i0] = 1.0 - t
    m[rows, i0 + 1] = t
    m.setflags(write=False)
    return m


def _check_classes(classes: Sequence[ClassSpec]) -> tuple[ClassSpec, ...]:
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes must not be empty")
    if len(classes) > 254:
        raise ValueError(f"at most 254 classes fit a uint8 mask, got {len(classes)}")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    for c in classes:
        for value, allowed, what in ((c.shape, SHAPES, "shape"), (c.colour, tuple(COLOURS), "colour"),
                                     (c.pattern, PATTERNS, "pattern"), (c.size, SIZES, "size")):
            if value not in allowed:
                raise ValueError(f"class {c.name!r}: unknown {what} {value!r} (one of {', '.join(allowed)})")
    return classes


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * _F(255.0)


class SceneGenerator:
    """Deterministic scene generator: ``scene(index)`` depends on ``(seed, index)`` only.

    Args:
        size: image side in pixels (square images), ≥ 16.
        num_objects: ``(lo, hi)`` inclusive range of objects per scene (or one int); objects have distinct
            classes, so ``hi ≤ len(classes)``. A scene can end up with fewer than drawn when an object finds no
            pose that keeps everything visible (rare).
        classes: the class table (default :data:`CLASSES`).
        seed: dataset seed.
    """

    def __init__(
        self,
        size: int = 128,
        num_objects: int | tuple[int, int] = (1, 3),
        classes: Sequence[ClassSpec] = CLASSES,
        seed: int = 0,
    ) -> None:
        if int(size) < 16:
            raise ValueError(f"size must be at least 16 pixels, got {size}")
        self.size = int(size)
        self.classes = _check_classes(classes)
        lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else tuple(num_objects)
        lo, hi = int(lo), int(hi)
        if not 1 <= lo <= hi <= len(self.classes):
            raise ValueError(f"num_objects must satisfy 1 <= lo <= hi <= {len(self.classes)} "
                             f"(objects have distinct classes), got {num_objects}")
        self.num_objects = (lo, hi)
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self._min_pixels = max(4, math.ceil(MIN_VISIBLE_IMAGE_FRACTION * self.size * self.size))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    # ----------------------------------------------------------------------------------------------------------

    def scene(self, index: int) -> Scene:
        """The scene number ``index`` (any non-negative int) of this generator's seed."""
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        S = self.size
        xs = _pixel_centres(S)
        lo, hi = self.num_objects
        k = int(rng.integers(lo, hi + 1))
        chosen = [int(c) for c in rng.choice(len(self.classes), size=k, replace=False)]

        ids = np.full((S, S), -1, dtype=np.int8)  # which object is on top at each pixel
        placed: list[dict[str, Any]] = []
        visible: list[int] = []
        needed: list[int] = []
        for cls in chosen:
            spec = self.classes[cls]
            lo_r, hi_r = SIZE_RADIUS[spec.size]
            for attempt in range(MAX_ATTEMPTS):
                r = float(rng.uniform(lo_r, hi_r)) * S
                angle = float(rng.uniform(0.0, 2.0 * math.pi))
                if not placed and attempt == MAX_ATTEMPTS - 1:
                    cx = cy = S / 2.0  # a scene always keeps its first object
                elif placed and rng.random() < OVERLAP_PROBABILITY:
                    other = placed[int(rng.integers(len(placed)))]
                    direction = float(rng.uniform(0.0, 2.0 * math.pi))
                    dist = (other["radius"] + r) * float(rng.uniform(0.35, 0.9))
                    cx = other["centre"][0] + dist * math.cos(direction)
                    cy = other["centre"][1] + dist * math.sin(direction)
                else:
                    margin = 0.5 * r
                    cx = float(rng.uniform(margin, S - margin))
                    cy = float(rng.uniform(margin, S - margin))
                x0, x1 = max(0, math.floor(cx - r) - 1), min(S, math.ceil(cx + r) + 2)
                y0, y1 = max(0, math.floor(cy - r) - 1), min(S, math.ceil(cy + r) + 2)
                if x0 >= x1 or y0 >= y1:
                    continue
                u, v = _local_coords(xs[x0:x1], xs[y0:y1], (cx, cy), angle)
                inv_r = _F(1.0 / r)
                cov = _SHAPE_TESTS[spec.shape](u * inv_r, v * inv_r)
                own = int(np.count_nonzero(cov))
                need = max(self._min_pixels, math.ceil(MIN_VISIBLE_FRACTION * SHAPE_AREA[spec.shape] * r * r))
                if own < need:
                    continue
                sub = ids[y0:y1, x0:x1]
                if placed:
                    hidden = np.bincount(sub[cov].astype(np.int64) + 1, minlength=len(placed) + 1)[1:]
                    if any(visible[j] - int(hidden[j]) < needed[j] for j in range(len(placed))):
                        continue
                    for j in range(len(placed)):
                        visible[j] -= int(hidden[j])
                sub[cov] = len(placed)
                placed.append({"cls": cls, "spec": spec, "radius": r, "centre": (cx, cy), "angle": angle,
                               "crop": (y0, y1, x0, x1), "cov": cov, "u": u, "v": v})
                visible.append(own)
                needed.append(need)
                break

        # colours, background, painting
        colours = []
        for obj in placed:
            base = np.array(COLOURS[obj["spec"].colour], dtype=np.float32)
            base = base * _F(rng.uniform(0.88, 1.08)) + rng.normal(0.0, 6.0, 3).astype(np.float32)
            colours.append(np.clip(base, 0.0, 255.0).astype(np.float32))
        style = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        image = self._background(rng, style, colours)
        for obj, base in zip(placed, colours):
            self._paint(rng, image, obj, base)
        noise = rng.standard_normal((S, S), dtype=np.float32) * _F(rng.uniform(1.0, 3.5))
        image += noise[:, :, None]
        np.clip(image, 0.0, 255.0, out=image)
        image += _F(0.5)
        image = image.astype(np.uint8)

        lut = np.zeros(len(placed) + 1, dtype=np.uint8)
        for j, obj in enumerate(placed):
            lut[j + 1] = obj["cls"] + 1
        mask = lut[ids.astype(np.int64) + 1]
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=len(self.classes) + 1)[1:])
        labels = tuple(int(c) for c in present)

        objects, boxes = [], []
        for j, obj in enumerate(placed):
            y0, y1, x0, x1 = obj["crop"]
            mine = ids[y0:y1, x0:x1] == j
            rows, cols = np.flatnonzero(mine.any(axis=1)), np.flatnonzero(mine.any(axis=0))
            box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
            boxes.append(box)
            objects.append(PlacedObject(
                class_index=obj["cls"], shape=obj["spec"].shape, centre=obj["centre"], radius=obj["radius"],
                angle=obj["angle"], colour=tuple(round(float(c)) for c in colours[j]),
                visible_pixels=int(np.count_nonzero(mine)), box=box,
            ))
        prefix = _CAPTION_PREFIXES[int(rng.integers(len(_CAPTION_PREFIXES)))]
        caption = scene_caption(prefix, [o["spec"] for o in placed], style)
        return Scene(image=image, mask=mask, labels=labels, caption=caption, boxes=tuple(boxes),
                     objects=tuple(objects), background=style, index=index, seed=self.seed,
                     names=tuple(self.classes[c].name for c in labels))

    def batch(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Scenes ``start … start + n − 1``: images ``(N, H, W, 3)`` uint8, masks ``(N, H, W)`` uint8,
        multi-hot labels ``(N, C)`` float32, captions."""
        S, n = self.size, int(n)
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        images = np.empty((n, S, S, 3), dtype=np.uint8)
        masks = np.empty((n, S, S), dtype=np.uint8)
        labels = np.zeros((n, len(self.classes)), dtype=np.float32)
        captions = []
        for i in range(n):
            sc = self.scene(start + i)
            images[i], masks[i] = sc.image, sc.mask
            labels[i, list(sc.labels)] = 1.0
            captions.append(sc.caption)
        return images, masks, labels, captions

    # ----------------------------------------------------------------------------------------------------------
    # rendering

    def _noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """``(S, S)`` smooth value noise with ``cells`` lattice cells per side, rescaled to [0, 1]."""
        m = _interp_matrix(self.size, cells)
        out = m @ rng.random((cells + 1, cells + 1), dtype=np.float32) @ m.T
        lo, hi = float(out.min()), float(out.max())
        return (out - _F(lo)) * _F(1.0 / max(hi - lo, 1e-6))

    def _background_colour(self, rng: np.random.Generator, objects: Sequence[np.ndarray]) -> np.ndarray:
        """A muted random colour far (in RGB) from every object colour and its pattern tint."""
        colour = _hsv(0.0, 0.0, 0.5)
        for _ in range(40):
            colour = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.5)), float(rng.uniform(0.2, 0.92)))
            if all(np.linalg.norm(colour - c) >= _BACKGROUND_MIN_DISTANCE
                   and np.linalg.norm(colour - (c + _F(_TINT) * (255.0 - c))) >= _BACKGROUND_MIN_TINT_DISTANCE
                   for c in objects):
                break
        return colour

    def _background(self, rng: np.random.Generator, style: str, objects: Sequence[np.ndarray]) -> np.ndarray:
        S = self.size
        c1 = self._background_colour(rng, objects)
        c2 = self._background_colour(rng, objects)
        if style == "mottled":
            t = _F(0.65) * self._noise(rng, int(rng.integers(3, 7))) + _F(0.35) * self._noise(
                rng, int(rng.integers(9, 17)))
        elif style == "gradient":
            a = float(rng.uniform(0.0, 2.0 * math.pi))
            g = (_pixel_centres(S) - _F(S / 2)) * _F(1.0 / S)
            t = (g * _F(math.cos(a)))[None, :] + (g * _F(math.sin(a)))[:, None]
            t = t + _F(0.5) + _F(0.15) * (self._noise(rng, 3) - _F(0.5))
            np.clip(t, 0.0, 1.0, out=t)
        elif style == "blotchy":
            xs = _pixel_centres(S)
            num = np.broadcast_to(c1, (S, S, 3)).copy()
            den = np.ones((S, S), dtype=np.float32)
            for _ in range(int(rng.integers(3, 7))):
                cb = c2 if rng.random() < 0.5 else self._background_colour(rng, objects)
                cx, cy = rng.uniform(0.0, S, 2)
                sigma = float(rng.uniform(0.08, 0.25)) * S
                k = _F(-0.5 / (sigma * sigma))
                ex = np.exp((xs - _F(cx)) ** 2 * k)
                ey = np.exp((xs - _F(cy)) ** 2 * k) * _F(rng.uniform(1.5, 4.0))
                w = ey[:, None] * ex[None, :]
                num += w[:, :, None] * cb
                den += w
            return num / den[:, :, None]
        else:  # wood-grain: warped parallel bands, two shades of one colour, fine streaks
            a = float(rng.uniform(0.0, math.pi))
            g = (_pixel_centres(S) - _F(S / 2)) * _F(1.0 / S)
            s = (g * _F(math.cos(a)))[None, :] + (g * _F(math.sin(a)))[:, None]
            phase = s * _F(rng.uniform(4.0, 10.0)) + _F(rng.uniform(0.4, 1.2)) * self._noise(
                rng, int(rng.integers(2, 4)))
            t = _F(0.5) + _F(0.5) * np.sin(phase * _F(2.0 * math.pi))
            t = t * t * _F(0.85) + _F(0.15) * self._noise(rng, int(rng.integers(20, 32)))
            c2 = c1 * _F(rng.uniform(0.45, 0.7))
        return c1 + t[:, :, None] * (c2 - c1)

    def _paint(self, rng: np.random.Generator, image: np.ndarray, obj: dict[str, Any], base: np.ndarray) -> None:
        spec: ClassSpec = obj["spec"]
        y0, y1, x0, x1 = obj["crop"]
        cov, u, v, r = obj["cov"], obj["u"], obj["v"], obj["radius"]
        tint = base + _F(_TINT) * (_F(255.0) - base)
        period = max(5.0, 0.42 * r)
        inv_p = _F(1.0 / period)
        pu, pv = (_F(x) for x in rng.uniform(0.0, 1.0, 2))
        if spec.pattern == "stripes":
            pattern = np.mod(u * inv_p + pu, _F(1.0)) < _F(0.42)
        elif spec.pattern == "dots":
            inv_p = _F(1.0 / (1.15 * period))
            a = np.mod(u * inv_p + pu, _F(1.0)) - _F(0.5)
            b = np.mod(v * inv_p + pv, _F(1.0)) - _F(0.5)
            pattern = a * a + b * b < _F(0.1)
        elif spec.pattern == "checker":
            inv_p = _F(1.0 / (1.1 * period))
            pattern = np.mod(np.floor(u * inv_p + pu) + np.floor(v * inv_p + pv), _F(2.0)) >= _F(1.0)
        else:
            pattern = None
        # soft shading: light from the top left of the image, whatever the object's rotation
        xs = _pixel_centres(self.size)
        k = _F(0.12 / r)
        shade = _F(1.0) - (xs[x0:x1] - _F(obj["centre"][0]))[None, :] * k - (
            xs[y0:y1] - _F(obj["centre"][1]))[:, None] * k
        if pattern is None:
            colour = shade[:, :, None] * base
        else:
            colour = (base + pattern[:, :, None] * (tint - base)) * shade[:, :, None]
        region = image[y0:y1, x0:x1]
        region[cov] = colour[cov]
