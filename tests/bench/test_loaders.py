"""VTAB-1k and FGVC datasets on tiny folders written here: class counts, shared label maps, aliases, errors."""

from __future__ import annotations

import pytest
import torch

from tests.bench._helpers import fake_fgvc, fake_vtab
from vpeft.data import build_dataset
from vpeft.data.fgvc import FGVCDataset, label_map
from vpeft.data.vtab import VTAB1K, VtabDataset, resolve_task, task_folder, write_task


def test_val_split_missing_classes_keeps_the_training_class_count(tmp_path):
    folder = fake_vtab(
        tmp_path / "xray",
        {"train800": [0, 1, 2, 3, 3], "val200": [0, 1], "train800val200": [0, 1, 2, 3, 3, 0, 1], "test": [2, 0]},
    )
    val = build_dataset("vtab", folder, "val200")
    assert val.num_classes == 4  # from the training lists, not val's max label + 1 = 2
    assert val.targets == [0, 1]
    test = VtabDataset(folder, "test")
    assert test.num_classes == 4 and test.targets == [2, 0]
    pixels, label = test[0]  # the image is the one the list names: grey level 10 * label
    assert label == 2 and torch.allclose(pixels, torch.full_like(pixels, 20 / 255))


def test_known_task_takes_the_class_count_from_the_table(tmp_path):
    folder = fake_vtab(tmp_path / "eurosat", {"train800": [0, 3], "val200": [1], "test": [9, 0]})
    test = VtabDataset(folder, "test", task="eurosat")
    assert test.num_classes == VTAB1K["eurosat"].num_classes == 10  # the lists alone would say 4
    with pytest.raises(ValueError, match=r"labels \[9\].*4 classes"):
        VtabDataset(folder, "test")  # no table: 9 exceeds the training lists' count
    with pytest.raises(ValueError, match="unknown split 'train'.*train800"):
        VtabDataset(folder, "train")


def test_aliases_resolve_and_folders_are_found_under_any_name(tmp_path):
    assert resolve_task("CIFAR-100").name == "cifar"
    assert resolve_task("vtab-oxford_pet").name == "oxford_iiit_pet"
    assert resolve_task("pets").name == resolve_task("oxford_iiit_pet").name
    with pytest.raises(KeyError, match="Did you mean 'smallnorb_azi'"):
        resolve_task("smallnorb_azim")
    (tmp_path / "cifar100").mkdir()  # SSF's and V-PETL's folder name
    assert task_folder(tmp_path, resolve_task("cifar")) == tmp_path / "cifar100"
    with pytest.raises(FileNotFoundError, match=r"\['dtd'\].*prepare"):
        task_folder(tmp_path, resolve_task("dtd"))


def test_write_task_produces_the_noah_layout(tmp_path):
    from tests.bench._helpers import image

    splits = {"train800": [(image(0), 0), (image(30), 3)], "val200": [(image(10), 1)], "test": [(image(20), 2)]}
    folder = write_task(tmp_path / "t", splits)
    lines = (folder / "train800val200.txt").read_text().splitlines()
    assert lines == ["images/train800val200/000000.jpg 0", "images/train800val200/000001.jpg 3",
                     "images/train800val200/000002.jpg 1"]  # fmt: skip
    data = VtabDataset(folder, "train800val200")
    assert data.num_classes == 4 and data.targets == [0, 3, 1]
    pixels, _ = data[1]  # JPEG at quality 95 keeps a flat grey within a level or two
    assert abs(pixels.mean().item() * 255 - 30) < 2
    with pytest.raises(FileExistsError):
        write_task(folder, splits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left behind


def test_fgvc_label_map_comes_from_train_for_every_split(tmp_path):
    # NABirds-like: val lacks class 3, so VPT's per-split map would give val labels 0, 1 instead of 1, 2
    folder = fake_fgvc(
        tmp_path / "birds",
        {
            "train": {"0003/a.jpg": 3, "0007/b.jpg": 7, "0011/c.jpg": 11},
            "val": {"0007/d.jpg": 7, "0011/e.jpg": 11},
            "test": {"0011/f.jpg": "11", "0003/g.jpg": 3},
        },
    )
    expected = {cid: i for i, cid in enumerate(sorted([3, 7, 11]))}
    val = FGVCDataset(folder, "val")
    assert val.num_classes == 3 and val.targets == [expected[7], expected[11]] == [1, 2]
    test = build_dataset("fgvc", folder, "test")
    assert test.targets == [expected[11], expected[3]] and test.classes == ["3", "7", "11"]
    assert test.samples[0][0] == folder / "images" / "0011" / "f.jpg"


def test_fgvc_ids_sort_numerically_and_unknown_ids_are_errors(tmp_path):
    assert label_map(["010", "002", "001"]) == {"1": 0, "2": 1, "10": 2}  # CUB's zero-padded ids, numeric order
    folder = fake_fgvc(
        tmp_path / "cub", {"train": {"001.A/x.jpg": "001", "002.B/y.jpg": "002"}, "test": {"003.C/z.jpg": "003"}}
    )
    with pytest.raises(ValueError, match=r"class ids \['003'\].*train.json lacks"):
        FGVCDataset(folder, "test")
    with pytest.raises(ValueError, match="2 classes, expected 200"):
        FGVCDataset(folder, "train", dataset="cub")
    (folder / "val.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a non-empty json object"):
        FGVCDataset(folder, "val")
    with pytest.raises(FileNotFoundError, match="datasets/fgvc.py prepare"):
        FGVCDataset(tmp_path / "nowhere", "train")
