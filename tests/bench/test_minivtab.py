"""MiniVTAB's generators: each label is what an independent measurement of the drawn image says it is."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from tests.bench._helpers import load_script
from tests.conftest import require_system_data

minivtab = load_script("datasets/minivtab.py")
SMALL = {"train800": 24, "val200": 8, "test": 8}


def pixels(image):
    return np.asarray(image, dtype=np.int32)


def test_count_is_the_number_of_separate_shapes():
    for image, label in minivtab.generate("mini_count", sizes=SMALL)["train800"]:
        ink = (pixels(image) > 60).any(axis=-1)  # background (40, 40, 48); shape colours have every channel >= 90
        assert ndimage.label(ink)[1] == label + 1


def test_location_is_the_bin_of_the_sprite_centre():
    for image, label in minivtab.generate("mini_location", sizes=SMALL)["train800"]:
        _, xs = np.nonzero(pixels(image)[..., 0] > 128)
        centre = xs.mean() + 0.5  # pixel i covers [i, i + 1)
        assert 4 + 3 * label - 1 <= centre <= 4 + 3 * (label + 1) + 1


def test_distance_is_the_row_bin_of_the_lowest_object():
    low, high = minivtab.NEAR_ROWS
    for image, label in minivtab.generate("mini_distance", sizes=SMALL)["train800"]:
        rgb = pixels(image)
        scene = (rgb == (120, 150, 200)).all(-1) | (rgb == (70, 90, 60)).all(-1)
        bottom = np.nonzero(~scene)[0].max() + 1  # the nearest object stands lowest
        width = (high - low) / 6
        assert high - (label + 1) * width - 1.5 <= bottom <= high - label * width + 1.5


def stain(image):
    return (pixels(image) >= 250).all(axis=-1)  # lesions are white; tissue stays at or below 0.55 * 255


def test_lesion_and_grade_mark_white_spots_on_tissue():
    for image, label in minivtab.generate("mini_lesion", sizes=SMALL)["train800"]:
        assert stain(image).any() == bool(label)
    for image, label in minivtab.generate("mini_grade", sizes=SMALL)["train800"]:
        spots = ndimage.label(stain(image))[1]
        assert spots <= label and (spots == 0) == (label == 0)  # lesions may overlap, never appear from nothing


@pytest.mark.parametrize("task", ["mini_digits", "mini_fashion"])
def test_array_tasks_are_balanced_and_disjoint(task):
    if task == "mini_fashion":
        require_system_data("dataset-fashion-mnist")
    splits = minivtab.generate(task, sizes={"train800": 40, "val200": 20, "test": 30})
    assert {s: len(v) for s, v in splits.items()} == {"train800": 40, "val200": 20, "test": 30}
    assert set(Counter(label for _, label in splits["train800"]).values()) == {4}
    seen = [pixels(img).tobytes() for split in splits.values() for img, _ in split]
    assert len(set(seen)) == len(seen)  # no image in two splits (or twice in one)
