"""datasets/clip_fewshot.py on a small fake dataset in CoOp's split-file format."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vpeft.data import build_dataset
from vpeft.errors import DataError

from ..bench._helpers import load_script

clip_fewshot = load_script("datasets/clip_fewshot.py")

CLASSES = ["abyssinian", "beagle", "boxer", "pug", "sphynx"]


@pytest.fixture
def coop_src(tmp_path):
    src = tmp_path / "oxford_pets"
    splits = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for i in range(7):
            split = "train" if i < 4 else "val" if i < 5 else "test"
            rel = f"{name}_{i}.jpg"
            (src / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (label * 40, i * 30, 0)).save(src / "images" / rel)
            splits[split].append([rel, label, name])
    (src / "split_zhou_OxfordPets.json").write_text(json.dumps(splits))
    return src


def test_prepare_writes_coops_splits_shots_and_base_novel(coop_src, tmp_path, capsys):
    out = tmp_path / "clip"
    argv = ["prepare", "--dataset", "oxford_pets", "--src", str(coop_src), "--out", str(out), "--shots", "2"]
    assert clip_fewshot.main([*argv, "--seeds", "1,2"]) == 0
    root = out / "oxford_pets"
    train = build_dataset("folder", root / "all", "train")
    assert train.classes == CLASSES and len(train) == 20
    shots = build_dataset("folder", root / "all", "train_2shot_seed1")
    assert len(shots) == 10 and sorted(shots.classes) == CLASSES
    again = clip_fewshot.few_shot(clip_fewshot.read_splits("oxford_pets", coop_src)["train"], 2, 1)
    listed = sorted(p.name for p in (root / "all" / "train_2shot_seed1").rglob("*.jpg"))
    assert listed == sorted(rel for rel, _, _ in again)
    assert build_dataset("folder", root / "base", "test").classes == CLASSES[:3]  # ceil(5 / 2) base classes
    assert build_dataset("folder", root / "novel", "test").classes == CLASSES[3:]
    assert clip_fewshot.main(["verify", "--root", str(out), "--dataset", "oxford_pets"]) == 0
    next((root / "all" / "test" / "pug").iterdir()).unlink()
    with pytest.raises(DataError, match="test: 9 images in 5 classes, expected 10 in 5"):
        clip_fewshot.main(["verify", "--root", str(out), "--dataset", "oxford_pets"])


def test_few_shot_is_seeded_per_class():
    items = [(f"{c}{i}.jpg", c, str(c)) for c in range(3) for i in range(10)]
    a, b = clip_fewshot.few_shot(items, 4, 1), clip_fewshot.few_shot(items, 4, 2)
    assert a == clip_fewshot.few_shot(items, 4, 1) and a != b
    assert [sum(1 for i in a if i[1] == c) for c in range(3)] == [4, 4, 4]
