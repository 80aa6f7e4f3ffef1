"""Procedural scenes with captions: the offline data of the CLIP track (pretraining, zero-shot and few-shot).

A scene is one filled shape on a noisy grey background, drawn small (32 x 32 by default). It has four attributes:
shape (``SHAPES``), colour (``COLOURS``), size (``SIZES``) and position (``POSITIONS``). Pretraining pairs each image
with a caption from ``CAPTION_TEMPLATES`` (``"a small red circle on the left."``); classification names a class by
colour and shape (``"red circle"``, 24 classes), so a class name is made of words the text tower has seen.

Held-out combinations: the six (colour, shape) pairs in ``HELD_OUT`` never appear in a pretraining caption or image,
so zero-shot accuracy on them measures composition, not memory. Base-to-novel: ``NOVEL`` holds those six and six more
(two shapes per colour), ``BASE`` the other twelve; each colour and each shape occurs on both sides.

Downstream images (``style="cluttered"``, the default of :class:`SceneDataset`) differ from pretraining ones
(``"clean"``): stronger noise, a tinted background and two dull distractor shapes, a domain shift that few-shot
training can close. Every image is a pure function of ``(seed, split, class, index)``: nothing is stored on disk.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .common import ImageDataset

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
STYLES = ("clean", "cluttered")

CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# class k = colour c, shape s with k = 4c + s; the diagonal (s - c) % 4 == 0 is held out of pretraining
HELD_OUT = tuple(k for k in range(len(CLASSES)) if (k % 4 - k // 4) % 4 == 0)
NOVEL = tuple(k for k in range(len(CLASSES)) if (k % 4 - k // 4) % 4 in (0, 1))
BASE = tuple(k for k in range(len(CLASSES)) if k not in NOVEL)
CLASS_SETS = {"all": tuple(range(len(CLASSES))), "base": BASE, "novel": NOVEL, "held_out": HELD_OUT}

CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} on the {position}.",
    "a {colour} {shape} on the {position}.",
    "a {size} {colour} {shape}.",
    "a photo of a {colour} {shape}.",
    "the {shape} on the {position} is {colour}.",
    "a {colour} {shape}.",
)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``parts`` (``crc32`` of their text, not Python's salted hash)."""
    return np.random.default_rng([seed, zlib.crc32(repr(parts).encode())])


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """(size, size) bool mask of a filled ``shape`` centred at (cx, cy) with circumradius ``radius`` (pixels)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = radius / np.sqrt(2)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up: apex at the top, base at cy + radius / 2
        top, bottom = cy - radius, cy + radius / 2
        half_width = (y - top) / (bottom - top) * radius * np.sqrt(3) / 2
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half_width)
    if shape == "cross":
        arm = radius / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ConfigError(f"unknown shape {shape!r}; shapes are {SHAPES}.")


def render(rng: np.random.Generator, shape: str, colour: str, size_word: str, position: str, image_size: int = 32,
           style: str = "clean") -> np.ndarray:  # fmt: skip
    """(image_size, image_size, 3) uint8 image of one scene; ``rng`` draws the exact placement and the noise."""
    if style not in STYLES:
        raise ConfigError(f"scene style must be one of {STYLES}, got {style!r}.")
    s = image_size / 32  # sizes below are for 32 px
    radius = rng.uniform(3.5, 5.0) * s if size_word == "small" else rng.uniform(7.5, 9.5) * s
    lo, hi = radius + 1, image_size - radius - 1
    near, far = (lo, min(image_size * 0.42, hi)), (max(image_size * 0.58, lo), hi)
    middle = (image_size * 0.35, image_size * 0.65)
    cx_range, cy_range = {
        "left": (near, middle), "right": (far, middle), "top": (middle, near), "bottom": (middle, far),
    }[position]  # fmt: skip
    cx, cy = rng.uniform(*cx_range), rng.uniform(*cy_range)
    grey = rng.uniform(40, 100)
    background = np.full(3, grey)
    noise = 10.0
    if style == "cluttered":
        background = background + rng.uniform(-30, 30, 3)  # a tint
        noise = 22.0
    image = np.broadcast_to(background, (image_size, image_size, 3)).astype(np.float64).copy()
    if style == "cluttered":
        for _ in range(2):  # dull distractors, drawn first so the named shape stays whole
            other = SHAPES[rng.integers(len(SHAPES))]
            mask = shape_mask(other, *rng.uniform(3, image_size - 3, 2), rng.uniform(2.5, 4.0) * s, image_size)
            image[mask] = rng.uniform(110, 170)
    image[shape_mask(shape, cx, cy, radius, image_size)] = np.array(COLOURS[colour]) * rng.uniform(0.8, 1.0)
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def caption_scene(index: int, seed: int = 0, image_size: int = 32) -> tuple[np.ndarray, str]:
    """Pretraining item ``index``: a clean scene of a combination outside ``HELD_OUT`` and one templated caption."""
    rng = _rng(seed, "caption", index)
    seen = [k for k in range(len(CLASSES)) if k not in HELD_OUT]
    k = seen[rng.integers(len(seen))]
    colour, shape = CLASSES[k].split()
    size_word, position = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
    text = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = text.format(size=size_word, colour=colour, shape=shape, position=position)
    return render(rng, shape, colour, size_word, position, image_size, "clean"), caption


def few_shot_counts(split: str, shots: int | None, test_per_class: int, val_per_class: int) -> int:
    """Items per class in ``split``: the shots for ``train`` (16 when not given), otherwise the split's size."""
    return {"train": shots or 16, "val": val_per_class, "test": test_per_class}[split]


class SceneDataset(ImageDataset):
    """Scenes classified by colour and shape (``CLASSES``), restricted to a class set, ``shots`` per class in train.

    Args:
        root: Ignored (scenes are drawn, not read); accepted so every dataset has the same signature.
        split: ``train`` (``shots`` per class), ``val`` (``val_per_class``) or ``test`` (``test_per_class``).
        transform: Applied to each RGB ``PIL.Image``.
        classes: ``all`` (24), ``base`` (12), ``novel`` (12) or ``held_out`` (6); labels are 0..n-1 in that set's
            order and ``classes`` holds their names.
        shots: Training images per class (the few-shot protocol's k: 1, 2, 4, 8, 16); ``seed`` draws which.
        seed: Seed of the drawn images; the test split does not depend on it, so every seed is scored on one set.
        style: ``cluttered`` (the downstream domain) or ``clean`` (the pretraining domain).
        image_size: Side in pixels.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable | None = None,
        classes: str = "all",
        shots: int | None = None,
        seed: int = 0,
        style: str = "cluttered",
        image_size: int = 32,
        val_per_class: int = 4,
        test_per_class: int = 50,
    ) -> None:
        super().__init__(transform)
        if classes not in CLASS_SETS:
            raise ConfigError(f"scenes option classes must be one of {sorted(CLASS_SETS)}, got {classes!r}.")
        if split not in ("train", "val", "test"):
            raise ConfigError(f"scenes split must be train, val or test, got {split!r}.")
        if shots is not None and shots < 1:
            raise ConfigError(f"scenes option shots must be at least 1, got {shots}.")
        if style not in STYLES:
            raise ConfigError(f"scenes option style must be one of {STYLES}, got {style!r}.")
        self.split, self.style, self.image_size = split, style, image_size
        self.seed = 0 if split == "test" else seed
        self.class_ids = CLASS_SETS[classes]
        self.classes = [CLASSES[k] for k in self.class_ids]
        per_class = few_shot_counts(split, shots, test_per_class, val_per_class)
        self.targets = [label for label in range(len(self.class_ids)) for _ in range(per_class)]
        self.index_in_class = [i for _ in self.class_ids for i in range(per_class)]

    def load(self, index: int) -> Image.Image:
        k = self.class_ids[self.targets[index]]
        rng = _rng(self.seed, self.split, k, self.index_in_class[index])
        colour, shape = CLASSES[k].split()
        size_word, position = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        return Image.fromarray(render(rng, shape, colour, size_word, position, self.image_size, self.style))
