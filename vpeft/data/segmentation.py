"""Semantic segmentation datasets (image + class-index mask pairs) and their joint transforms.

``SEG_DATASETS`` maps ``data.name`` to a constructor ``(root, split, transform, **data.options)``:

================  ===================================================================================================
name              layout
================  ===================================================================================================
``seg_folder``    ``<root>/images/<split>/<stem>.<jpg|png|...>`` + ``<root>/annotations/<split>/<stem>.png``;
                  ``num_classes`` given; ``reduce_zero_label`` optional
``ade20k``        ADEChallengeData2016: the same layout, splits ``training`` / ``validation``, 150 classes, and
                  ``reduce_zero_label``: mask value 0 ("other") is ignored and classes 1..150 become 0..149, as
                  mmsegmentation's ADE20K pipeline does
``shapes``        :mod:`vpeft.data.shapes` scenes, written to ``root`` on first use (options ``counts``, ``size``,
                  ``seed``); 4 classes, 0 = background
================  ===================================================================================================

A mask is a single-channel PNG of class indices; ``IGNORE_INDEX`` (255) marks pixels the loss and the metrics skip.
Any other value outside ``[0, num_classes)`` is an error that names the file and the values found.

Transforms (:func:`build_seg_transform`) use ``torchvision.transforms.v2`` on an ``(Image, Mask)`` pair, so every
geometric step moves both, the mask with nearest-neighbour sampling: training takes a random resized crop to the
backbone's input size and a horizontal flip; evaluation resizes to the input size, or with ``eval_short_side``
keeps the aspect ratio (for sliding-window inference). The image is normalised with the backbone's mean and std.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data import default_collate as torch_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import ConfigError, DataError, MissingFileError
from ..registry import lookup
from .common import IMG_EXTENSIONS, check_root, load_rgb
from .shapes import CLASSES as SHAPE_CLASSES
from .shapes import write_shapes

IGNORE_INDEX = 255
ADE20K_CLASSES = 150


class SegmentationFolder(Dataset):
    """Pairs ``images/<split>/<stem>.*`` with ``annotations/<split>/<stem>.png``; items ``(image, mask)``.

    Args:
        root: Dataset root.
        split: Split folder name under ``images`` and ``annotations``.
        transform: Joint transform of ``(tv_tensors.Image, tv_tensors.Mask)`` (see :func:`build_seg_transform`).
        num_classes: Number of classes (mask values ``0..num_classes-1`` after ``reduce_zero_label``).
        reduce_zero_label: Mask 0 becomes ignored and every other value drops by one (ADE20K).
        classes: Class names, ``num_classes`` of them; default ``"0"``, ``"1"``, ...
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        num_classes: int | None = None,
        reduce_zero_label: bool = False,
        classes: Sequence[str] | None = None,
    ):
        if num_classes is None or num_classes < 1 or num_classes > IGNORE_INDEX:
            raise ConfigError(
                f"dataset: num_classes must be given in data.options as an integer in 1..{IGNORE_INDEX}, "
                f"got {num_classes}."
            )
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(f"dataset: {len(classes)} class names for num_classes={num_classes}.")
        root = check_root("seg_folder", root, Path("images") / split)
        check_root("seg_folder", root, Path("annotations") / split)
        images = sorted(p for p in (root / "images" / split).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not images:
            raise MissingFileError(f"dataset: no images in {root / 'images' / split} ({', '.join(IMG_EXTENSIONS)}).")
        masks = [root / "annotations" / split / f"{p.stem}.png" for p in images]
        missing = [str(m) for m in masks if not m.is_file()]
        if missing:
            raise MissingFileError(f"dataset: {len(missing)} images have no mask, e.g. {missing[:3]}.")
        self.pairs = list(zip(images, masks, strict=True))
        self.transform, self.num_classes, self.reduce_zero_label = transform, num_classes, reduce_zero_label
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, path: Path) -> np.ndarray:
        """The (H, W) int64 class indices of ``path``, after ``reduce_zero_label``, checked against the class range."""
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"{path}: a mask must be a single-channel PNG of class indices, not mode {image.mode}."
                )
            mask = np.asarray(image).astype(np.int64)
        if self.reduce_zero_label:  # 0 -> ignore, k -> k - 1
            mask = np.where(mask == 0, IGNORE_INDEX + 1, mask) - 1
        values = np.unique(mask)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != IGNORE_INDEX)]
        if bad.size:
            shift = " (after reduce_zero_label)" if self.reduce_zero_label else ""
            raise DataError(
                f"{path}: mask values {bad[:10].tolist()}{shift} are outside the class range 0..{self.num_classes - 1} "
                f"(num_classes={self.num_classes}; {IGNORE_INDEX} = ignore). Check num_classes and reduce_zero_label."
            )
        return mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(image_path)))
        mask = tv_tensors.Mask(torch.from_numpy(self.read_mask(mask_path)))
        if image.shape[-2:] != mask.shape[-2:]:
            raise DataError(f"{mask_path}: mask size {tuple(mask.shape)} differs from image size {image.shape[-2:]}.")
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor)


class ADE20K(SegmentationFolder):
    """ADEChallengeData2016 (splits ``training``, ``validation``): 150 classes, ``reduce_zero_label`` on."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, reduce_zero_label: bool = True):
        super().__init__(root, split, transform, ADE20K_CLASSES, reduce_zero_label)


class ShapesSegmentation(SegmentationFolder):
    """:mod:`vpeft.data.shapes` scenes, written to ``root`` first when absent; background + circle/square/triangle."""

    def __init__(
        self,
        root: str | Path | None,
        split: str,
        transform: Callable | None = None,
        counts: Mapping[str, int] | None = None,
        size: int = 64,
        seed: int = 0,
    ):
        if root is None:
            raise MissingFileError("dataset 'shapes' needs data.root: the folder to write the scenes to (or read).")
        write_shapes(root, dict(counts) if counts is not None else None, size, seed)
        super().__init__(root, split, transform, len(SHAPE_CLASSES) + 1, classes=("background", *SHAPE_CLASSES))


SEG_DATASETS: dict[str, Callable[..., SegmentationFolder]] = {
    "seg_folder": SegmentationFolder,
    "ade20k": ADE20K,
    "shapes": ShapesSegmentation,
}


def build_seg_dataset(name: str, root: str | Path | None, split: str, transform: Callable | None, **options: Any):
    return lookup(SEG_DATASETS, name, "segmentation dataset")(root, split, transform, **options)


def build_seg_transform(
    data_config: Mapping[str, Any],
    train: bool,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    eval_short_side: int | None = None,
) -> Callable:
    """Joint ``(Image, Mask)`` transform: random resized crop + flip (train) or resize (eval), then normalise.

    ``scale`` is the crop's area range as a fraction of the image, ``ratio`` its aspect-ratio range (``[1, 1]``
    keeps shapes undistorted); ``eval_short_side`` keeps the aspect ratio at
    evaluation (images larger than the input size then need sliding-window inference).
    """
    size = tuple(int(s) for s in data_config["input_size"][1:])
    interpolation = str_to_interp_mode(data_config.get("interpolation") or "bilinear")
    if train:
        geometric = [
            v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometric = [v2.Resize(eval_short_side or size, interpolation=interpolation)]
    return v2.Compose(
        [
            *geometric,
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
        ]
    )


def collate_pairs(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor | list[Tensor], Tensor | list[Tensor]]:
    """Stack ``(image, mask)`` pairs of one size; keep lists when sizes differ (aspect-preserving evaluation)."""
    if len({tuple(image.shape) for image, _ in batch}) == 1:
        return tuple(torch_collate(batch))
    return [image for image, _ in batch], [mask for _, mask in batch]
