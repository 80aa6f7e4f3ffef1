"""Shared pieces of the dataset classes: the base class, image loading, root checks and balanced subsets.

Every dataset in :mod:`vpeft.data` subclasses :class:`ImageDataset`: it stores ``(source, label)`` pairs or
arrays, turns one item into an RGB ``PIL.Image`` in :meth:`ImageDataset.load`, and ``__getitem__`` applies the
transform so that the result is always ``(image_tensor, int_label)``. Grayscale sources are converted to
3-channel RGB images so every backbone sees three channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from vpeft.data.system import SYSTEM_DATA, install_hint

from ..errors import ConfigError, DataError, MissingFileError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

FASHION_MNIST_ROOT = str(SYSTEM_DATA["dataset-fashion-mnist"])

PREPARE_HINTS: dict[str, str] = {
    "folder": (
        "Expected an ImageFolder layout: <root>/<split>/<class_name>/*.{jpg,jpeg,png,bmp,webp}, with one folder per "
        "split (e.g. train, val, test); the class list is read from <root>/train unless classes_from says otherwise."
    ),
    "list": (
        "Expected the NOAH VTAB-1k layout: <root>/<split>.txt list files (train800.txt, val200.txt, "
        "train800val200.txt, test.txt) whose lines read '<path relative to root> <integer label>', with the images "
        "under <root>. Prepare the VTAB-1k data as described in the NOAH repository (github.com/ZhangYuanhan-AI/NOAH)."
    ),
    "fashion_mnist": (
        f"To use the default root ({FASHION_MNIST_ROOT}), {install_hint('dataset-fashion-mnist')}; or pass "
        "data.root pointing at a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
    ),
}


def check_root(name: str, root: str | Path | None, path: str | Path | None = None) -> Path:
    """Return ``Path(root)`` or raise a ``FileNotFoundError`` saying what is missing and how to prepare it.

    Args:
        name: The dataset's registry name; selects the preparation hint.
        root: The dataset root given by the user.
        path: A file or folder inside ``root`` that must exist (checked after ``root`` itself); optional.

    Returns:
        The root as a ``Path``.

    Raises:
        FileNotFoundError: When ``root`` is ``None`` or does not exist, or when ``path`` does not exist.
    """
    hint = PREPARE_HINTS.get(name, "")
    if root is None:
        raise MissingFileError(f"dataset {name!r} needs a root folder (data.root); none was given. {hint}".strip())
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"dataset {name!r}: root folder {str(root)!r} does not exist. {hint}".strip())
    if path is not None:
        full = root / path
        if not full.exists():
            raise MissingFileError(
                f"dataset {name!r}: {str(full)!r} does not exist under root {str(root)!r}. {hint}".strip()
            )
    return root


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grayscale modes (a 16-bit PNG opens as I;16)


def readable_mode(image: Image.Image) -> bool:
    """Whether :func:`load_rgb` reads ``image``'s pixels: 8-bit modes, and 16-bit grayscale (a PNG may open as 32-bit
    ``I``, which holds 16-bit values); float pixels (``F``) and other 32-bit integers have no known range."""
    return image.mode not in ("F", "I") or (image.mode == "I" and image.format == "PNG")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file with PIL and convert it to 8-bit RGB (grayscale, palette and RGBA images included).

    16-bit grayscale is scaled by its depth (65535 -> 255): PIL's own conversion would clip it to 255. A file that
    cannot be decoded, or holds float pixels, raises a :class:`DataError` naming it.
    """
    try:
        with Image.open(path) as image:
            if not readable_mode(image):
                raise DataError(f"{path}: pixel mode {image.mode} is not read; save 8-bit or 16-bit images.")
            if image.mode in SIXTEEN_BIT or image.mode == "I":
                eight = np.round(np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8)
                return Image.fromarray(eight).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}).") from None


def gray_to_rgb(array: np.ndarray) -> Image.Image:
    """Turn a 2-D ``uint8`` array into a 3-channel RGB ``PIL.Image``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {array.shape}")
    return Image.fromarray(array).convert("RGB")  # a 2-D uint8 array opens in mode "L"


def balanced_subset(labels: Sequence[int] | np.ndarray, size: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Pick a deterministic, class-balanced subset of indices.

    Each class gets ``size // num_classes`` items, and the first ``size % num_classes`` classes one more; a class
    with fewer items gives all it has. The choice within a class is random under ``seed``; the result is sorted.

    Args:
        labels: One integer label per item.
        size: How many items to keep in total.
        num_classes: Number of classes (labels lie in ``[0, num_classes)``).
        seed: Seed of the ``numpy`` generator that draws the items.

    Returns:
        Sorted ``int64`` indices into ``labels``.
    """
    if size <= 0:
        raise ConfigError(f"subset must be a positive number of items, got {size}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    base, extra = divmod(size, num_classes)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        take = min(base + (1 if c < extra else 0), len(members))
        chosen.append(rng.choice(members, size=take, replace=False) if take else members[:0])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class ImageDataset(Dataset):
    """Base class: ``__getitem__`` returns ``(transform(rgb_image), int_label)``.

    Subclasses set ``classes`` and ``targets`` (one ``int`` label per item) and implement :meth:`load`.

    Attributes:
        classes: Class names; ``classes[label]`` names a label.
        targets: The label of every item, in order.
        transform: Applied to the RGB ``PIL.Image``; when ``None`` the image becomes a float tensor in ``[0, 1]``.
    """

    classes: list[str]
    targets: list[int]

    def __init__(self, transform: Callable | None = None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of ``classes``)."""
        return len(self.classes)

    def load(self, index: int) -> Image.Image:
        """Return item ``index`` as an RGB ``PIL.Image``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        image = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(items={len(self)}, num_classes={self.num_classes})"
