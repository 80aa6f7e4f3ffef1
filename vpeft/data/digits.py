"""scikit-learn's handwritten digits (``sklearn.datasets.load_digits``): shipped with scikit-learn, no download.

1,797 grayscale 8x8 images with 17 gray levels (0-16), 10 classes ``"0"``-``"9"``. The pixels are scaled to
``uint8`` (``round(v * 255 / 16)``) and returned as 3-channel RGB ``PIL`` images; the transform upscales them.

Splits come from a deterministic stratified split (``sklearn.model_selection.train_test_split``) seeded by
``seed``: ``test`` gets ``round(1797 * test_fraction)`` images, ``val`` ``round(1797 * val_fraction)`` of the rest,
``train`` the remainder. With the defaults (0.2, 0.2) that is train 1,079, val 359, test 359. The three splits are
disjoint and cover all 1,797 images; ``root`` is ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.data.common import ImageDataset, gray_to_rgb
from vpeft.deps import require
from vpeft.errors import ConfigError


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = require("sklearn.datasets", "offline", "the digits dataset").load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images.setflags(write=False)
    return images, bunch.target.astype(np.int64)


def digits_split_indices(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """Return sorted, disjoint, stratified index arrays ``{"train", "val", "test"}`` over the 1,797 digits.

    Args:
        seed: ``random_state`` of both stratified splits.
        val_fraction: Share of all images that goes to ``val``.
        test_fraction: Share of all images that goes to ``test``.
    """
    train_test_split = require("sklearn.model_selection", "offline", "the digits splits").train_test_split
    _, labels = _digits()
    total = len(labels)
    n_test, n_val = round(total * test_fraction), round(total * val_fraction)
    if n_test < 1 or n_val < 1 or n_test + n_val >= total:
        raise ConfigError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no valid split")
    index = np.arange(total)
    rest, test = train_test_split(index, test_size=n_test, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class Digits(ImageDataset):
    """The scikit-learn digits as RGB images with a seeded stratified train/val/test split.

    Args:
        root: Ignored (the data ships with scikit-learn); accepted so every dataset has the same signature.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: Applied to each 8x8 RGB ``PIL.Image`` (resize it to the backbone's input size).
        seed: Seed of the split.
        val_fraction: Share of all images in ``val``; default 0.2.
        test_fraction: Share of all images in ``test``; default 0.2.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable | None = None,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
    ) -> None:
        super().__init__(transform)
        splits = digits_split_indices(seed, val_fraction, test_fraction)
        if split not in splits:
            raise ConfigError(f"digits split must be one of {sorted(splits)}, got {split!r}")
        images, labels = _digits()
        self.split = split
        self.indices = splits[split]
        self.images = images[self.indices]
        self.targets = labels[self.indices].tolist()
        self.classes = [str(i) for i in range(10)]

    def load(self, index: int) -> Image.Image:
        return gray_to_rgb(self.images[index])
