"""Procedural scenes of shapes with exact masks and boxes: an offline segmentation and detection task for CPU.

A scene is a noisy background of one random colour with up to ``max_shapes`` filled circles, squares and triangles
(random size, position, rotation and colour; colour says nothing about the class, the outline does). Shapes drawn
later occlude earlier ones; a shape that would hide more than half of an earlier one is redrawn elsewhere, so every
instance stays mostly visible. Masks are rasterised with ``skimage.draw``; each instance's mask is its *visible*
pixels and its box their exact extent.

:func:`write_shapes` lays the scenes out as an ADE20K-style semantic segmentation folder plus COCO instance files::

    <root>/images/<split>/<id>.png         RGB
    <root>/annotations/<split>/<id>.png    semantic mask, uint8: 0 background, 1..3 = CLASSES
    <root>/instances_<split>.json          COCO: file_name relative to images/<split>, bbox [x, y, w, h],
                                           RLE segmentation (pycocotools.mask.encode), area = mask pixels
    <root>/shapes.json                     manifest: the parameters; written last
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..deps import require
from ..errors import ConfigError, ExistingPathError

mask_utils = require("pycocotools.mask", "shapes", "the shapes scenes' COCO masks")
_draw = require("skimage.draw", "shapes", "drawing the shapes scenes")
disk, polygon = _draw.disk, _draw.polygon

CLASSES = ("circle", "square", "triangle")  # class ids 1..3; 0 is background
MANIFEST = "shapes.json"
FORMAT = "vpeft.shapes"
VERSION = 1
MAX_TRIES = 20  # placements tried per shape before it is left out
MIN_VISIBLE = 0.5  # a new shape may hide at most half of an earlier one

Box = tuple[float, float, float, float]


@dataclass
class Scene:
    """``image`` (H, W, 3) uint8, ``semantic`` (H, W) int64 in 0..3, ``instances`` [(class_id, mask, box)]."""

    image: np.ndarray
    semantic: np.ndarray
    instances: list[tuple[int, np.ndarray, Box]] = field(default_factory=list)


def _raster(rng: np.random.Generator, class_id: int, size: int) -> np.ndarray:
    """A (size, size) bool mask of one random shape of ``class_id``."""
    radius = rng.uniform(0.1, 0.25) * size  # circumradius
    cy, cx = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
    mask = np.zeros((size, size), bool)
    if CLASSES[class_id - 1] == "circle":
        mask[disk((cy, cx), radius, shape=mask.shape)] = True
        return mask
    corners = 4 if CLASSES[class_id - 1] == "square" else 3
    angles = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
    mask[polygon(cy + radius * np.sin(angles), cx + radius * np.cos(angles), shape=mask.shape)] = True
    return mask


def _box(mask: np.ndarray) -> Box:
    """Exclusive pixel extent (x0, y0, x1, y1) of a non-empty mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def render_scene(rng: np.random.Generator, size: int = 64, max_shapes: int = 4) -> Scene:
    """One scene of 1..``max_shapes`` shapes drawn from ``rng`` (the same generator state gives the same scene)."""
    if size < 8 or max_shapes < 1:
        raise ConfigError(
            f"render_scene needs size >= 8 and max_shapes >= 1, got size={size}, max_shapes={max_shapes}."
        )
    owner = np.full((size, size), -1, np.int64)  # index of the instance that shows at each pixel
    classes: list[int] = []
    for _ in range(rng.integers(1, max_shapes + 1)):
        class_id = int(rng.integers(1, len(CLASSES) + 1))
        for _ in range(MAX_TRIES):
            mask = _raster(rng, class_id, size)
            if not mask.any():
                continue
            trial = np.where(mask, len(classes), owner)
            kept = np.bincount(trial[trial >= 0], minlength=len(classes) + 1)[: len(classes)]
            full = np.bincount(owner[owner >= 0], minlength=len(classes))
            if np.all(kept >= MIN_VISIBLE * full):
                owner, classes = trial, [*classes, class_id]
                break
    background = rng.uniform(0, 255, 3)
    image = background + rng.normal(0, 12, (size, size, 3))
    colours = rng.uniform(0, 255, (len(classes), 3))
    image[owner >= 0] = colours[owner[owner >= 0]]
    semantic = np.zeros((size, size), np.int64)
    instances = []
    for i, class_id in enumerate(classes):
        mask = owner == i
        if mask.any():  # an earlier shape may still vanish under several later ones together
            semantic[mask] = class_id
            instances.append((class_id, mask, _box(mask)))
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), semantic, instances)


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """A generator per (seed, split, index): a scene does not depend on the other splits' counts."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _write_split(root: Path, split: str, count: int, size: int, seed: int) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        scene = render_scene(_scene_rng(seed, split, index), size)
        name = f"{index:06d}.png"
        Image.fromarray(scene.image).save(root / "images" / split / name)
        Image.fromarray(scene.semantic.astype(np.uint8)).save(root / "annotations" / split / name)
        images.append({"id": index + 1, "file_name": name, "height": size, "width": size})
        for class_id, mask, (x0, y0, x1, y1) in scene.instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": class_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / f"instances_{split}.json").write_text(json.dumps(coco))


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_shapes(
    root: str | os.PathLike,
    counts: dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the shapes dataset to ``root`` (layout in the module docstring) and return ``root``.

    The whole tree is written into a temporary folder beside ``root`` and renamed into place, so ``root`` is either
    absent or complete (also when several processes call this together: the first rename wins). A ``root`` that
    already holds a copy with the same parameters is kept as is; one with other parameters, or other files, is an
    error rather than overwritten.
    """
    root = Path(root)
    counts = dict(counts if counts is not None else {"train": 200, "val": 50, "test": 50})
    bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1 or "/" in k or not k}
    if bad:
        raise ConfigError(f"write_shapes counts must map split names to positive integers, got {bad}.")
    manifest = {"format": FORMAT, "version": VERSION, "counts": counts, "size": size, "seed": seed}
    if _read_manifest(root) == manifest:
        return root
    _check_free(root, manifest)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        for split, count in counts.items():
            _write_split(tmp, split, count, size, seed)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep its copy when it is the same
            if _read_manifest(root) != manifest:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_free(root: Path, manifest: dict) -> None:
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    found = _read_manifest(root)
    what = f"a shapes dataset with other parameters ({found})" if found else "files that are not a shapes dataset"
    raise ExistingPathError(f"{root} holds {what}; wanted {manifest}. Remove it or choose another root.")


__all__ = ["CLASSES", "Scene", "render_scene", "write_shapes"]
