"""Fashion-MNIST from its IDX files, parsed with ``numpy`` and ``gzip`` (no torchvision download code).

Layout (the Debian package ``dataset-fashion-mnist`` installs it in ``/usr/share/datasets/fashion-mnist``)::

    <root>/train-images-idx3-ubyte.gz   <root>/train-labels-idx1-ubyte.gz   (60,000 images)
    <root>/t10k-images-idx3-ubyte.gz    <root>/t10k-labels-idx1-ubyte.gz    (10,000 images)

Uncompressed files (the same names without ``.gz``) are read too. Splits: ``train`` is the first
``60,000 - val_size`` training images (50,000 by default), ``val`` the remaining ``val_size`` (10,000), ``test``
the t10k files. ``subset`` keeps a deterministic class-balanced subset (seeded by ``seed``) for small runs. The
28x28 grayscale images are returned as 3-channel RGB ``PIL`` images before the transform.

IDX format: a big-endian header of two zero bytes, a type byte (``0x08`` = ``uint8``, ...), a byte with the number of
dimensions, one big-endian ``int32`` per dimension, then the data. Images use magic ``2051`` (``0x00000803``) and
labels ``2049`` (``0x00000801``).
"""

from __future__ import annotations

import functools
import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.data.common import FASHION_MNIST_ROOT, ImageDataset, balanced_subset, check_root, gray_to_rgb
from vpeft.errors import ConfigError, DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) into a read-only ``numpy`` array.

    Args:
        path: The IDX file.
        magic: Expected magic number (e.g. ``2051`` for images, ``2049`` for labels); ``None`` accepts any valid one.

    Returns:
        The array, shaped by the header's dimensions, in native byte order.

    Raises:
        ValueError: On a wrong magic number, an unknown type code or a data size that does not match the header;
            the message names the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    return _parse_idx(data, path, magic)


def _parse_idx(data: bytes, path: Path, magic: int | None) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{str(path)!r} is not an IDX file: only {len(data)} bytes")
    (found,) = struct.unpack(">i", data[:4])
    zero, type_code, ndim = found >> 16, (found >> 8) & 0xFF, found & 0xFF
    if magic is not None and found != magic:
        raise DataError(f"{str(path)!r}: wrong IDX magic number {found} (0x{found:08x}), expected {magic}")
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{str(path)!r} is not an IDX file: bad magic number {found} (0x{found:08x})")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{str(path)!r}: header says shape {shape} ({expected} bytes) but {len(data) - header} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    check_root("fashion_mnist", root, f"{stem}.gz")  # raises with the preparation hint
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=4)
def _load_pair(root: str, prefix: str, mtime_key: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    del mtime_key  # only part of the cache key, so edited files are read again
    base = Path(root)
    images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES_MAGIC)
    labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {prefix} files in {root!r}: {images.shape} images do not match {labels.shape} labels"
        )
    return images, labels.astype(np.int64)


def load_idx_pair(root: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` (cached per file version).

    Returns:
        ``(images, labels)``: ``uint8`` images ``(N, H, W)`` and ``int64`` labels ``(N,)``, both read-only.
    """
    root = check_root("fashion_mnist", root)
    paths = [_find(root, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    mtimes = (paths[0].stat().st_mtime, paths[1].stat().st_mtime)
    return _load_pair(str(root.resolve()), prefix, mtimes)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST (10 classes, 28x28 grayscale returned as RGB) read from the IDX files.

    Args:
        root: Folder with the four IDX files; default ``/usr/share/datasets/fashion-mnist``.
        split: ``"train"`` (first ``60,000 - val_size``), ``"val"`` (last ``val_size`` of the training files) or
            ``"test"`` (t10k files).
        transform: Applied to each RGB ``PIL.Image``.
        val_size: Number of training-file images held out as ``val``; default 10,000.
        subset: Keep only this many items, class-balanced, chosen with ``seed``; ``None`` keeps all.
        seed: Seed for ``subset``.

    Raises:
        FileNotFoundError: When the folder or a file is missing (the message says how to install the data).
        ValueError: On an unknown split, a bad ``val_size`` or a malformed IDX file.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Callable | None = None,
        val_size: int = 10_000,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(transform)
        if split not in ("train", "val", "test"):
            raise ConfigError(f"Fashion-MNIST split must be 'train', 'val' or 'test', got {split!r}")
        root = check_root("fashion_mnist", FASHION_MNIST_ROOT if root is None else root)
        images, labels = load_idx_pair(root, "t10k" if split == "test" else "train")
        if split != "test":
            if not 0 <= val_size < len(images):
                raise ConfigError(f"val_size must lie in [0, {len(images)}), got {val_size}")
            cut = len(images) - val_size
            images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
        self.classes = list(FASHION_MNIST_CLASSES)
        if subset is not None:
            keep = balanced_subset(labels, subset, self.num_classes, seed)
            images, labels = images[keep], labels[keep]
        self.root, self.split = root, split
        self.images = images
        self.targets = labels.tolist()

    def load(self, index: int) -> Image.Image:
        return gray_to_rgb(self.images[index])
