"""COCO-format object detection: an images folder and an ``instances_*.json`` file (Lin et al., ECCV 2014).

Each item is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8 (3, H, W), before the transforms) and
``target`` a dict with

- ``boxes``: ``tv_tensors.BoundingBoxes`` (n, 4) in XYXY pixels (COCO's ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]``),
- ``labels``: int64 (n,) contiguous labels ``1..K`` in the order of the json's category ids (0 is the background of
  torchvision's detectors); ``classes[k - 1]`` is label k's category name, ``category_ids[k - 1]`` its json id,
- ``iscrowd``: int64 (n,) COCO crowd flags: crowd regions are kept, for the evaluation to ignore (COCOeval's rule);
  the detection task drops them from the training targets, as torchvision's detectors know no ignore regions,
- ``area``: float32 (n,) the json's ``area`` (the mask area in COCO; COCOeval's small/medium/large ranges use it),
- ``image_id`` (the json's id) and ``index`` (the item's position in the dataset).

Images without annotations are kept (they count for false positives in the evaluation). Every annotation is checked
when the dataset is built: an unknown image or category, a degenerate box (width or height <= 0) or a box that
leaves the image raises a ``ValueError`` naming the annotation and image ids. ``clip_boxes=True`` instead clips boxes
to the image and drops those left degenerate (real COCO files hold a few such boxes; the COCO configs set it).

The transforms are ``torchvision.transforms.v2`` joint transforms over ``(image, target)`` (flips move the boxes);
:func:`detection_transforms` gives the default ones and :func:`collate` keeps images and targets as lists (images
differ in size; torchvision's detectors batch them themselves).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError, DataError, MissingFileError
from ..registry import lookup
from .common import load_rgb
from .shapes import write_shapes

log = logging.getLogger("vpeft")
Target = dict[str, Any]


class CocoDetection(Dataset):
    """A COCO instances json over an images folder; see the module docstring for items and checks."""

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        clip_boxes: bool = False,
    ):
        self.root, self.transforms = Path(images), transforms
        path = Path(annotations)
        if not path.is_file():
            raise MissingFileError(f"COCO annotations {path} do not exist.")
        if not self.root.is_dir():
            raise MissingFileError(f"COCO images folder {self.root} does not exist.")
        coco = json.loads(path.read_text())
        missing = [k for k in ("images", "annotations", "categories") if k not in coco]
        if missing:
            raise DataError(f"{path} is not a COCO instances file: it has no {missing}.")
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.classes = [str(c["name"]) for c in categories]
        self.images = list(coco["images"])
        self._targets = _read_annotations(path, self.images, coco["annotations"], self.category_ids, clip_boxes)

    @property
    def num_classes(self) -> int:
        """Foreground classes K (labels 1..K)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        info = self.images[index]
        image = TF.to_image(load_rgb(self.root / info["file_name"]))  # (3, H, W) uint8
        size = (int(info["height"]), int(info["width"]))
        if tuple(image.shape[-2:]) != size:
            raise DataError(
                f"image {info['id']} ({info['file_name']}) is {image.shape[-1]}x{image.shape[-2]} pixels but the json "
                f"says {size[1]}x{size[0]}; its boxes are in the json's size."
            )
        boxes, labels, crowd, area = self._targets[index]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=size),
            "labels": labels.clone(),
            "iscrowd": crowd.clone(),
            "area": area.clone(),
            "image_id": int(info["id"]),
            "index": index,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _read_annotations(
    path: Path, images: list[dict], annotations: list[dict], category_ids: list[int], clip: bool
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(boxes XYXY, labels, iscrowd, area) per image, in the order of ``images``; every annotation checked."""
    position = {}
    for i, info in enumerate(images):
        if not {"id", "file_name", "height", "width"} <= set(info):
            raise DataError(f"{path}: image entry {info.get('id', i)} needs id, file_name, height and width.")
        position[info["id"]] = i
    label_of = {cid: k + 1 for k, cid in enumerate(category_ids)}
    rows: list[list[tuple[list[float], int, int, float]]] = [[] for _ in images]
    bad: list[str] = []
    dropped = 0
    for ann in annotations:
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if image_id not in position:
            raise DataError(f"{path}: annotation {ann_id} refers to image {image_id}, which is not in `images`.")
        if ann.get("category_id") not in label_of:
            raise DataError(
                f"{path}: annotation {ann_id} (image {image_id}) has category_id {ann.get('category_id')}; the "
                f"categories are {category_ids}."
            )
        info = images[position[image_id]]
        width, height = float(info["width"]), float(info["height"])
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w, y + h]
        problem = None
        if w <= 0 or h <= 0:
            problem = "is degenerate (width or height <= 0)"
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            problem = f"leaves the {info['width']}x{info['height']} image"
        if problem and clip:
            box = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)]
            box += [min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
                continue
        elif problem:
            bad.append(f"annotation {ann_id} of image {image_id} ({info['file_name']}): bbox {ann['bbox']} {problem}")
            continue
        area = float(ann.get("area", (box[2] - box[0]) * (box[3] - box[1])))
        rows[position[image_id]].append((box, label_of[ann["category_id"]], int(ann.get("iscrowd", 0)), area))
    if bad:
        raise DataError(
            f"{path}: {len(bad)} boxes are degenerate or outside their image, e.g. {'; '.join(bad[:3])}. Fix the "
            "annotations, or pass clip_boxes=True (data.options) to clip boxes to the image and drop degenerate ones."
        )
    if dropped:
        log.info("vpeft: %s: dropped %d boxes left degenerate after clipping to the image", path, dropped)
    return [_as_tensors(r) for r in rows]


def _as_tensors(rows: list[tuple[list[float], int, int, float]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    boxes = torch.tensor(np.array([r[0] for r in rows], np.float32).reshape(-1, 4))  # (n, 4), n may be 0
    labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    crowd = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    area = torch.tensor([r[3] for r in rows], dtype=torch.float32)
    return boxes, labels, crowd, area


def detection_transforms(train: bool, flip: float = 0.5) -> v2.Compose:
    """Float images in [0, 1] (the detector normalises and resizes them); training adds a horizontal flip."""
    steps: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if train and flip > 0:
        steps.append(v2.RandomHorizontalFlip(flip))
    return v2.Compose(steps)


def collate(batch: list[tuple[Any, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Lists of plain tensors: ``([image (3, H, W)], [target])`` (tv_tensors unwrapped for torchvision's models)."""
    plain = lambda v: v.as_subclass(Tensor) if isinstance(v, Tensor) else v  # noqa: E731
    return [plain(image) for image, _ in batch], [{k: plain(v) for k, v in t.items()} for _, t in batch]


def build_coco(
    root: str | os.PathLike,
    split: str,
    transforms: Callable | None = None,
    images: str = "{split}2017",
    annotations: str = "annotations/instances_{split}2017.json",
    clip_boxes: bool = False,
) -> CocoDetection:
    """The COCO 2017 layout under ``root`` by default; ``images``/``annotations`` are templates over ``{split}``."""
    images_dir, annotations_file = (Path(root) / t.format(split=split) for t in (images, annotations))
    return CocoDetection(images_dir, annotations_file, transforms, clip_boxes)


def build_shapes(
    root: str | os.PathLike,
    split: str,
    transforms: Callable | None = None,
    counts: dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
) -> CocoDetection:
    """The procedural shapes scenes (:mod:`vpeft.data.shapes`), written to ``root`` once, read as COCO."""
    root = write_shapes(root, counts, size, seed)
    return CocoDetection(root / "images" / split, root / f"instances_{split}.json", transforms)


DETECTION_DATASETS: dict[str, Callable[..., CocoDetection]] = {"coco": build_coco, "shapes": build_shapes}


def build_detection_dataset(name: str, root: str | os.PathLike, split: str, train: bool, **options: Any):
    """A registered detection dataset with :func:`detection_transforms` (option ``flip``: training flip chance)."""
    if root is None:
        raise ConfigError(f"data.root is required for the detection dataset {name!r}.")
    builder = lookup(DETECTION_DATASETS, name, "detection dataset")
    flip = options.pop("flip", 0.5)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("root", "split", "transforms")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ConfigError(
            f"data.options {unknown} are not options of detection dataset {name!r}; it takes {accepted + ['flip']}."
        )
    return builder(root, split, detection_transforms(train, flip), **options)


__all__ = [
    "DETECTION_DATASETS",
    "CocoDetection",
    "build_coco",
    "build_detection_dataset",
    "build_shapes",
    "collate",
    "detection_transforms",
]
