"""The scenes: class sets, held-out pairs absent from pretraining captions, seeded shots, deterministic drawing."""

from __future__ import annotations

import numpy as np
import pytest

from vpeft.data import build_dataset
from vpeft.data.scenes import BASE, CLASSES, COLOURS, HELD_OUT, NOVEL, SHAPES, SceneDataset, caption_scene, shape_mask
from vpeft.errors import ConfigError


def test_class_sets_split_every_attribute():
    assert len(CLASSES) == 24 and set(BASE) | set(NOVEL) == set(range(24)) and not set(BASE) & set(NOVEL)
    assert set(HELD_OUT) <= set(NOVEL) and len(HELD_OUT) == 6
    for side in (BASE, NOVEL):
        words = {w for k in side for w in CLASSES[k].split()}
        assert words == set(COLOURS) | set(SHAPES)  # every word is seen on both sides


def test_pretraining_captions_never_name_a_held_out_pair():
    held = [CLASSES[k].split() for k in HELD_OUT]
    for i in range(600):
        _, caption = caption_scene(i)
        words = caption.rstrip(".").split()
        assert not any(colour in words and shape in words for colour, shape in held), caption


def test_shots_seeds_and_determinism():
    train = SceneDataset(split="train", classes="base", shots=4, seed=1)
    assert len(train) == 48 and train.classes == [CLASSES[k] for k in BASE]
    assert np.bincount(train.targets).tolist() == [4] * 12
    again = build_dataset("scenes", None, "train", None, classes="base", shots=4, seed=1)
    other = SceneDataset(split="train", classes="base", shots=4, seed=2)
    assert np.array_equal(np.asarray(train.load(5)), np.asarray(again.load(5)))
    assert not np.array_equal(np.asarray(train.load(5)), np.asarray(other.load(5)))
    test_a, test_b = SceneDataset(split="test", seed=1), SceneDataset(split="test", seed=2)
    assert np.array_equal(np.asarray(test_a.load(7)), np.asarray(test_b.load(7)))  # one test set for every seed


def test_the_named_shape_is_drawn_in_its_colour():
    image = np.asarray(SceneDataset(split="test", classes="all", style="clean").load(0)).astype(int)  # red circle
    red = (image[..., 0] > 150) & (image[..., 1] < 110) & (image[..., 2] < 110)
    assert red.sum() > 20


def test_shape_masks_have_their_areas():
    r, size = 40.0, 200
    assert shape_mask("circle", 100, 100, r, size).sum() == pytest.approx(np.pi * r**2, rel=0.01)
    assert shape_mask("square", 100, 100, r, size).sum() == pytest.approx(2 * r**2, rel=0.02)
    assert shape_mask("triangle", 100, 100, r, size).sum() == pytest.approx(3 * np.sqrt(3) / 4 * r**2, rel=0.02)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="classes must be one of"):
        SceneDataset(classes="some")
    with pytest.raises(ConfigError, match="shots must be at least 1"):
        SceneDataset(shots=0)
