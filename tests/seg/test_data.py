"""Segmentation folders: pairing, ADE20K's reduce_zero_label, mask range errors, joint image + mask transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.data.segmentation import (
    ADE20K,
    IGNORE_INDEX,
    SegmentationFolder,
    build_seg_dataset,
    build_seg_transform,
)

CONFIG = {"input_size": (3, 16, 16), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "nearest"}


def _pair(root: Path, split: str, stem: str, mask: np.ndarray, suffix: str = ".jpg") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    image = np.stack([mask * 40 % 256, np.full_like(mask, 7), np.zeros_like(mask)], -1).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / split / f"{stem}{suffix}")
    Image.fromarray(mask.astype(np.uint8)).save(root / "annotations" / split / f"{stem}.png")


def test_ade20k_reduces_the_zero_label(tmp_path):
    mask = np.array([[0, 1], [150, 7]])
    _pair(tmp_path, "training", "a", mask, ".png")
    dataset = ADE20K(tmp_path, "training")
    assert dataset.num_classes == 150 and len(dataset) == 1
    _, target = dataset[0]
    assert target.dtype == torch.int64 and target.tolist() == [[IGNORE_INDEX, 0], [149, 6]]


def test_mask_values_outside_the_classes_name_the_file(tmp_path):
    _pair(tmp_path, "train", "ok", np.array([[0, 3], [IGNORE_INDEX, 1]]))
    _pair(tmp_path, "train", "bad", np.array([[0, 4], [9, 1]]))
    dataset = SegmentationFolder(tmp_path, "train", num_classes=4)
    assert [p.name for p, _ in dataset.pairs] == ["bad.jpg", "ok.jpg"]
    assert dataset[1][1].tolist() == [[0, 3], [IGNORE_INDEX, 1]]  # 255 is the ignore label, not an error
    with pytest.raises(ValueError, match=r"bad\.png: mask values \[4, 9\] are outside the class range 0\.\.3"):
        dataset[0]
    _pair(tmp_path, "training", "x", np.array([[0, 151]]), ".png")
    with pytest.raises(ValueError, match=r"x\.png: mask values \[150\] \(after reduce_zero_label\)"):
        ADE20K(tmp_path, "training")[0]


def test_folder_errors_name_what_is_wrong(tmp_path):
    _pair(tmp_path, "train", "a", np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="num_classes must be given in data.options"):
        SegmentationFolder(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"images.*val.*does not exist"):
        SegmentationFolder(tmp_path, "val", num_classes=2)
    (tmp_path / "images" / "train" / "b.jpg").write_bytes((tmp_path / "images" / "train" / "a.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"1 images have no mask, e\.g\. \['.*b\.png'\]"):
        SegmentationFolder(tmp_path, "train", num_classes=2)
    Image.new("RGB", (2, 2)).save(tmp_path / "annotations" / "train" / "b.png")
    with pytest.raises(ValueError, match=r"b\.png: a mask must be a single-channel PNG .* mode RGB"):
        SegmentationFolder(tmp_path, "train", num_classes=2)[1]
    with pytest.raises(KeyError, match="unknown segmentation dataset 'ade'.*'ade20k'"):
        build_seg_dataset("ade", tmp_path, "train", None)


@pytest.mark.parametrize("seed", range(4))
def test_training_transform_moves_image_and_mask_together(tmp_path, seed):
    """The image's red channel encodes the mask (value * 40): after crop, resize and flip they still agree."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 5, (6, 6)), np.ones((7, 5), int))  # 42 x 30 blocks of classes
    _pair(tmp_path, "train", "a", mask, ".png")
    torch.manual_seed(seed)
    dataset = SegmentationFolder(tmp_path, "train", build_seg_transform(CONFIG, train=True), num_classes=5)
    image, target = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and target.shape == (16, 16)
    torch.testing.assert_close((image[0] * 255 / 40).round().long(), target)
    torch.testing.assert_close(image[1], torch.full((16, 16), 7 / 255))  # scaled to [0, 1], then normalised


def test_eval_transform_resizes_or_keeps_the_aspect_ratio(tmp_path):
    _pair(tmp_path, "val", "a", np.kron(np.arange(4).reshape(2, 2), np.ones((20, 40), int)), ".png")
    config = {**CONFIG, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    image, target = SegmentationFolder(tmp_path, "val", build_seg_transform(config, train=False), num_classes=4)[0]
    assert image.shape == (3, 16, 16) and target.tolist()[0][:2] == [0, 0] and target[-1, -1] == 3
    torch.testing.assert_close(image[1], torch.full((16, 16), (7 / 255 - 0.5) / 0.25))
    keep = build_seg_transform(config, train=False, eval_short_side=20)
    image, target = SegmentationFolder(tmp_path, "val", keep, num_classes=4)[0]
    assert image.shape == (3, 20, 40) and target.shape == (20, 40)  # 40 x 80 -> 20 x 40


def test_shapes_dataset_writes_on_first_use(tmp_path):
    dataset = build_seg_dataset("shapes", tmp_path / "s", "val", None, counts={"train": 2, "val": 3}, size=16)
    assert len(dataset) == 3 and dataset.num_classes == 4
    assert dataset.classes == ["background", "circle", "square", "triangle"]
    assert (tmp_path / "s" / "shapes.json").is_file()
