"""Folder and list (NOAH VTAB-1k) datasets on small image files written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.data import DATASETS, FolderDataset, ListDataset, build_dataset


def _png(path: Path, value: int, mode: str = "RGB", size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, (value * 3) % 256, (value * 7) % 256)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    for i, name in enumerate(["cat", "dog", "emu"]):
        _png(tmp_path / "train" / name / f"{i}a.png", 10 * i + 1)
        _png(tmp_path / "train" / name / f"{i}b.PNG", 10 * i + 2)
    _png(tmp_path / "train" / "cat" / "gray.png", 77, mode="L")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / "test" / "cat" / "x.png", 5)
    _png(tmp_path / "test" / "emu" / "y.png", 6)  # test lacks "dog"
    return tmp_path


def test_folder_label_map_comes_from_train(folder_root: Path) -> None:
    train = build_dataset("folder", folder_root, "train")
    test = build_dataset("folder", folder_root, "test")
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    assert train.num_classes == test.num_classes == 3
    assert len(train) == 7  # the .txt file is skipped
    labels = {Path(p).parent.name: label for p, label in test.samples}
    assert labels == {"cat": 0, "emu": 2}
    image, label = test[1]
    assert isinstance(image, torch.Tensor) and isinstance(label, int) and label == 2


def test_folder_grayscale_png_becomes_rgb(folder_root: Path) -> None:
    ds = FolderDataset(folder_root, "train", transform=None)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p.name == "gray.png")
    image, label = ds[index]
    assert label == 0 and image.shape == (3, 5, 6)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert torch.allclose(image, torch.full_like(image, 77 / 255))
    assert ds.load(index).mode == "RGB"


def test_folder_classes_from_and_unknown_class(folder_root: Path) -> None:
    ds = FolderDataset(folder_root, "test", classes_from="test")
    assert ds.classes == ["cat", "emu"] and ds.targets == [0, 1]
    with pytest.raises(ValueError, match="dog"):
        FolderDataset(folder_root, "train", classes_from="test")  # train has a class the map lacks
    _png(folder_root / "test" / "fox" / "z.png", 9)
    with pytest.raises(ValueError, match="fox"):
        FolderDataset(folder_root, "test")


@pytest.fixture
def list_root(tmp_path: Path) -> Path:
    rows = {"train800": [("a", 0), ("b", 3)], "val200": [("c", 4)], "test": [("d", 1), ("e", 4)]}
    rows["train800val200"] = rows["train800"] + rows["val200"]
    for split, entries in rows.items():
        for name, label in entries:
            _png(tmp_path / "images" / split / f"{name}.png", 20 + label)
        lines = [f"images/{split}/{name}.png {label}" for name, label in entries]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n\n")
    return tmp_path


def test_list_dataset_reads_noah_lines(list_root: Path) -> None:
    test = build_dataset("list", list_root, "test")
    assert test.train_list == "train800val200"
    assert test.num_classes == 5 and test.classes == ["0", "1", "2", "3", "4"]
    assert test.targets == [1, 4]
    image, label = test[1]
    assert label == 4 and image.shape == (3, 5, 6)
    assert torch.allclose(image[0], torch.full((5, 6), 24 / 255))


def test_list_dataset_train_list_fallback_and_errors(list_root: Path) -> None:
    (list_root / "train800val200.txt").unlink()
    with pytest.raises(ValueError, match="label 4"):
        ListDataset(list_root, "test")  # train800 only has labels up to 3
    assert ListDataset(list_root, "train800").num_classes == 4
    (list_root / "bad.txt").write_text("images/x.png\n")
    with pytest.raises(ValueError, match="line 1"):
        ListDataset(list_root, "bad")


def test_missing_roots_explain_how_to_prepare(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        build_dataset("folder", missing, "train")
    assert "<split>/<class_name>" in str(err.value)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train800.txt") as err:
        build_dataset("list", tmp_path / "empty", "test")
    assert "NOAH" in str(err.value)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", missing, "train")


def test_unknown_dataset_name_suggests_close_matches() -> None:
    with pytest.raises(KeyError) as err:
        build_dataset("fashion-mnist", None, "train")
    assert "fashion_mnist" in str(err.value) and "Did you mean" in str(err.value)
    assert set(DATASETS) >= {"folder", "list", "fashion_mnist", "digits"}


def test_pixel_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 3, 3), dtype=np.uint8)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "p.png")
    image, _ = FolderDataset(tmp_path, "train")[0]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))
