"""Procedural shapes: masks, boxes, semantic maps and COCO files checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from vpeft.data import shapes
from vpeft.data.shapes import CLASSES, render_scene, write_shapes


def _extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.argwhere(mask).T
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.mark.parametrize("seed", range(12))
def test_scene_masks_boxes_and_semantic_agree(seed):
    scene = render_scene(np.random.default_rng(seed), size=48, max_shapes=5)
    assert scene.image.shape == (48, 48, 3) and scene.image.dtype == np.uint8
    assert scene.semantic.shape == (48, 48) and scene.semantic.dtype == np.int64
    assert 1 <= len(scene.instances) <= 5
    union = np.zeros((48, 48), np.int64)
    covered = np.zeros((48, 48), int)
    for class_id, mask, box in scene.instances:
        assert class_id in range(1, len(CLASSES) + 1) and mask.dtype == bool and mask.any()
        assert box == _extent(mask)
        union[mask] = class_id
        covered += mask
    assert covered.max() <= 1  # visible masks are disjoint
    np.testing.assert_array_equal(scene.semantic, union)
    # shapes are flat colours: every instance's pixels share one colour
    for _, mask, _ in scene.instances:
        assert len(np.unique(scene.image[mask], axis=0)) == 1


def _square(top: int, left: int, side: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _two_shape_rng() -> np.random.Generator:
    """A generator whose first draw (the shape count, max_shapes=2) is 2."""
    seed = next(s for s in range(100) if np.random.default_rng(s).integers(1, 3) == 2)
    return np.random.default_rng(seed)


def test_later_shapes_occlude_earlier_ones(monkeypatch):
    a, b = _square(2, 2, 10), _square(8, 8, 6)  # b hides 16 of a's 100 pixels
    masks = iter([a, b])
    monkeypatch.setattr(shapes, "_raster", lambda rng, class_id, size: next(masks))
    scene = render_scene(_two_shape_rng(), size=32, max_shapes=2)
    (_, first, box1), (_, second, box2) = scene.instances
    np.testing.assert_array_equal(first, a & ~b)
    np.testing.assert_array_equal(second, b)
    assert box1 == (2.0, 2.0, 12.0, 12.0) and box2 == (8.0, 8.0, 14.0, 14.0)


def test_a_shape_hiding_most_of_another_is_redrawn(monkeypatch):
    a, cover, c = _square(2, 2, 10), _square(0, 0, 12), _square(20, 20, 5)
    masks = iter([a, cover, c])  # `cover` would hide all of `a`: it is replaced by the next draw
    monkeypatch.setattr(shapes, "_raster", lambda rng, class_id, size: next(masks))
    scene = render_scene(_two_shape_rng(), size=32, max_shapes=2)
    np.testing.assert_array_equal(scene.instances[0][1], a)
    np.testing.assert_array_equal(scene.instances[1][1], c)


def test_same_generator_state_same_scene():
    a, b = render_scene(np.random.default_rng(7)), render_scene(np.random.default_rng(7))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    assert [(c, box) for c, _, box in a.instances] == [(c, box) for c, _, box in b.instances]


def test_render_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size >= 8"):
        render_scene(np.random.default_rng(0), size=4)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", {"train": 6, "val": 3}, size=32, seed=3)


def test_layout_and_semantic_pngs(written):
    for split, count in (("train", 6), ("val", 3)):
        images = sorted((written / "images" / split).glob("*.png"))
        masks = sorted((written / "annotations" / split).glob("*.png"))
        assert len(images) == len(masks) == count
        assert [p.name for p in images] == [p.name for p in masks]
        image, mask = Image.open(images[0]), np.asarray(Image.open(masks[0]))
        assert image.mode == "RGB" and image.size == (32, 32)
        assert mask.dtype == np.uint8 and mask.max() <= len(CLASSES)


def test_coco_json_matches_the_semantic_masks(written):
    for split in ("train", "val"):
        coco = COCO(str(written / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            semantic = np.asarray(Image.open(written / "annotations" / split / info["file_name"])).astype(np.int64)
            union = np.zeros_like(semantic)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert anns
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                x0, y0, x1, y1 = _extent(mask)
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
                assert not union[mask].any()  # instances disjoint
                union[mask] = ann["category_id"]
            np.testing.assert_array_equal(union, semantic)


def test_write_is_deterministic_and_seeded(tmp_path):
    counts = {"train": 3, "test": 2}
    a = write_shapes(tmp_path / "a", counts, size=32, seed=1)
    b = write_shapes(tmp_path / "b", counts, size=32, seed=1)
    c = write_shapes(tmp_path / "c", counts, size=32, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "images/train/000000.png").read_bytes() != (c / "images/train/000000.png").read_bytes()
    # a split's scenes do not depend on the other splits' counts
    d = write_shapes(tmp_path / "d", {"train": 3}, size=32, seed=1)
    assert (d / "instances_train.json").read_bytes() == (a / "instances_train.json").read_bytes()


def test_write_skips_a_complete_copy_and_refuses_other_contents(tmp_path, monkeypatch):
    root = write_shapes(tmp_path / "s", {"train": 2}, size=16)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def boom(*args, **kwargs):
        raise AssertionError("wrote again")

    monkeypatch.setattr(shapes, "_write_split", boom)
    assert write_shapes(root, {"train": 2}, size=16) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    with pytest.raises(FileExistsError, match="other parameters"):
        write_shapes(root, {"train": 3}, size=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a shapes dataset"):
        write_shapes(tmp_path / "other", {"train": 2}, size=16)
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_shapes(tmp_path / "s", {"train": 4}, size=16)
    assert list(tmp_path.iterdir()) == []  # neither the root nor a temporary folder


def test_counts_are_checked(tmp_path):
    with pytest.raises(ValueError, match="positive integers"):
        write_shapes(tmp_path / "s", {"train": 0})
    manifest = json.loads((write_shapes(tmp_path / "t", {"val": 1}, size=16) / "shapes.json").read_text())
    assert manifest["counts"] == {"val": 1} and manifest["size"] == 16
