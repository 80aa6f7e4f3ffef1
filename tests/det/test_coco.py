"""COCO-format detection data: parsing against the json, the box checks, joint transforms and the collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from vpeft.data.coco import CocoDetection, build_detection_dataset, collate, detection_transforms


def write_coco(root: Path, annotations: list[dict], sizes=((20, 30), (16, 16), (24, 12))) -> Path:
    """Images ``<root>/img/<id>.png`` of (height, width) ``sizes`` (ids 11, 12, ...) and ``<root>/ann.json``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{11 + i}.png")
        images.append({"id": 11 + i, "file_name": f"{11 + i}.png", "height": h, "width": w})
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # ids out of order and not contiguous
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


GOOD = [
    {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2.5, 1.0, 10.0, 4.0], "area": 33.0, "iscrowd": 0},
    {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0.0, 0.0, 30.0, 20.0], "area": 600.0, "iscrowd": 1},
    {"id": 5, "image_id": 13, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 5.0], "area": 15.0, "iscrowd": 0},
]


def test_items_follow_the_json(tmp_path):
    dataset = CocoDetection(tmp_path / "img", write_coco(tmp_path, GOOD))
    assert len(dataset) == 3  # image 12 has no annotation and is kept
    assert dataset.classes == ["cat", "dog"] and dataset.category_ids == [3, 7] and dataset.num_classes == 2
    label = {3: 1, 7: 2}
    for index, image_id, anns in [(0, 11, GOOD[:2]), (1, 12, []), (2, 13, GOOD[2:])]:
        image, target = dataset[index]
        pixels = np.array(Image.open(tmp_path / "img" / f"{image_id}.png"))
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].shape == (len(anns), 4)
        assert target["boxes"].tolist() == expected
        assert tuple(target["boxes"].canvas_size) == pixels.shape[:2]
        assert target["labels"].tolist() == [label[a["category_id"]] for a in anns]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["image_id"] == image_id and target["index"] == index


@pytest.mark.parametrize(
    "bbox, problem",
    [([3.0, 1.0, 0.0, 4.0], "degenerate"), ([3.0, 1.0, 5.0, -1.0], "degenerate"), ([25.0, 1.0, 6.0, 4.0], "leaves")],
)
def test_bad_boxes_are_named_with_their_annotation_and_image(tmp_path, bbox, problem):
    bad = {"id": 42, "image_id": 11, "category_id": 7, "bbox": bbox, "area": 1.0, "iscrowd": 0}
    path = write_coco(tmp_path, [*GOOD, bad])
    with pytest.raises(ValueError, match=rf"1 boxes.*annotation 42 of image 11 \(11\.png\).*{problem}.*clip_boxes"):
        CocoDetection(tmp_path / "img", path)


def test_clip_boxes_clips_to_the_image_and_drops_what_is_left_degenerate(tmp_path):
    outside = {"id": 8, "image_id": 11, "category_id": 7, "bbox": [-2.0, 15.0, 40.0, 10.0], "area": 9.0, "iscrowd": 0}
    gone = {"id": 9, "image_id": 11, "category_id": 7, "bbox": [31.0, 0.0, 4.0, 4.0], "area": 9.0, "iscrowd": 0}
    flat = {"id": 10, "image_id": 12, "category_id": 7, "bbox": [1.0, 1.0, 0.0, 4.0], "area": 0.0, "iscrowd": 0}
    dataset = CocoDetection(tmp_path / "img", write_coco(tmp_path, [outside, gone, flat]), clip_boxes=True)
    # image 11 is 30 wide and 20 high: [-2, 15, 38, 25] -> [0, 15, 30, 20]; x from 31 is wholly outside
    assert dataset[0][1]["boxes"].tolist() == [[0.0, 15.0, 30.0, 20.0]]
    assert dataset[1][1]["boxes"].shape == (0, 4)


def test_unknown_category_and_image_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"annotation 1 \(image 11\) has category_id 5; the categories are \[3, 7\]"):
        CocoDetection(tmp_path / "img", write_coco(tmp_path, [{**GOOD[0], "category_id": 5}]))
    with pytest.raises(ValueError, match="annotation 1 refers to image 99"):
        CocoDetection(tmp_path / "img", write_coco(tmp_path, [{**GOOD[0], "image_id": 99}]))


def test_image_size_must_match_the_json(tmp_path):
    path = write_coco(tmp_path, GOOD)
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "12.png")
    with pytest.raises(ValueError, match=r"image 12 \(12\.png\) is 8x8 pixels but the json says 16x16"):
        CocoDetection(tmp_path / "img", path)[1]


def test_flip_moves_the_boxes_and_collate_keeps_lists(tmp_path):
    transforms = detection_transforms(train=True, flip=1.0)
    dataset = CocoDetection(tmp_path / "img", write_coco(tmp_path, GOOD), transforms)
    image, target = dataset[0]
    raw = torch.from_numpy(np.array(Image.open(tmp_path / "img" / "11.png"))).permute(2, 0, 1)
    torch.testing.assert_close(image, raw.flip(-1).float() / 255)
    # x -> width - x: [2.5, 1, 12.5, 5] in a 30-wide image becomes [17.5, 1, 27.5, 5]
    assert target["boxes"][0].tolist() == [17.5, 1.0, 27.5, 5.0] and target["area"][0] == 33.0
    images, targets = collate([dataset[0], dataset[2]])
    assert [tuple(i.shape) for i in images] == [(3, 20, 30), (3, 24, 12)]
    assert type(images[0]) is torch.Tensor and type(targets[0]["boxes"]) is torch.Tensor
    assert [t["image_id"] for t in targets] == [11, 13]


def test_unknown_dataset_options_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"\['clip'\] are not options of detection dataset 'coco'.*clip_boxes"):
        build_detection_dataset("coco", tmp_path, "val", False, clip=True)
