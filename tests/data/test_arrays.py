"""IDX parsing on tiny files, the real Fashion-MNIST (when installed) and the scikit-learn digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vpeft.data import Digits, FashionMNIST, balanced_subset, build_dataset, read_idx
from vpeft.data.digits import digits_split_indices

from ..conftest import require_system_data


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    dims = array.shape
    magic = (0x08 << 8 | len(dims)) if magic is None else magic
    payload = struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(payload)


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    for prefix, n in (("train", 7), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 3, 2)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_read_idx_parses_header_and_data(idx_root: Path) -> None:
    images = read_idx(idx_root / "train-images-idx3-ubyte.gz", magic=2051)
    labels = read_idx(idx_root / "train-labels-idx1-ubyte.gz", magic=2049)
    assert images.shape == (7, 3, 2) and images.dtype == np.uint8
    assert labels.tolist() == list(range(7))
    expected = np.random.default_rng(3).integers(0, 256, (7, 3, 2)).astype(np.uint8)
    assert np.array_equal(images, expected)


def test_read_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _write_idx(path, np.arange(3), magic=2051)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*magic"):
        read_idx(path, magic=2049)
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">ii", 2049, 5) + b"\x00\x01")  # header says 5 items, 2 follow
    with pytest.raises(ValueError, match="5"):
        read_idx(path, magic=2049)


def test_fashion_mnist_splits_on_tiny_files(idx_root: Path) -> None:
    train = FashionMNIST(idx_root, "train", val_size=2)
    val = build_dataset("fashion_mnist", idx_root, "val", val_size=2)
    test = FashionMNIST(idx_root, "test")
    assert (len(train), len(val), len(test)) == (5, 2, 4)
    assert train.targets == [0, 1, 2, 3, 4] and val.targets == [5, 6]
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    image, label = val[1]
    raw = read_idx(idx_root / "train-images-idx3-ubyte.gz")[6]
    assert label == 6 and image.shape == (3, 3, 2)
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(np.array(raw)).expand(3, 3, 2))
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(idx_root, "validation")


def test_balanced_subset_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 10, 10, 2])
    first = balanced_subset(labels, 10, 4, seed=1)
    assert np.array_equal(first, balanced_subset(labels, 10, 4, seed=1))
    assert not np.array_equal(first, balanced_subset(labels, 10, 4, seed=2))
    assert np.bincount(labels[first], minlength=4).tolist() == [3, 3, 2, 2]


def test_real_fashion_mnist() -> None:
    require_system_data("dataset-fashion-mnist")
    sizes = {split: FashionMNIST(split=split) for split in ("train", "val", "test")}
    assert {k: len(v) for k, v in sizes.items()} == {"train": 50_000, "val": 10_000, "test": 10_000}
    for ds in sizes.values():
        assert min(ds.targets) == 0 and max(ds.targets) == 9
    image, label = sizes["test"][0]
    assert image.shape == (3, 28, 28) and 0 <= label < 10
    small = FashionMNIST(split="train", subset=50, seed=0)
    assert len(small) == 50 and np.bincount(small.targets, minlength=10).tolist() == [5] * 10


def test_digits_split_is_disjoint_stratified_and_seeded() -> None:
    splits = digits_split_indices(seed=0)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == round(1797 * 0.2)
    union = np.concatenate(list(splits.values()))
    assert len(np.unique(union)) == 1797
    datasets = {k: Digits(split=k) for k in splits}
    all_targets = np.concatenate([datasets[k].targets for k in splits])
    per_class = np.bincount(all_targets, minlength=10)
    for k, ds in datasets.items():
        counts = np.bincount(ds.targets, minlength=10)
        assert np.all(np.abs(counts - per_class * sizes[k] / 1797) <= 1.0), (k, counts)
    assert all(np.array_equal(splits[k], digits_split_indices(seed=0)[k]) for k in splits)
    assert not np.array_equal(splits["test"], digits_split_indices(seed=1)["test"])


def test_digits_items_are_rgb_uint8_scaled() -> None:
    ds = build_dataset("digits", None, "train")
    assert ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    assert ds.images.dtype == np.uint8 and ds.images.max() == 255
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and 0 <= label < 10 and torch.equal(image[0], image[2])
