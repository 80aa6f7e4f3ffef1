"""The preparation tools: verify names every problem of a broken folder; prepare fixes names, lists and paths."""

from __future__ import annotations

import json

from tests.bench._helpers import fake_fgvc, fake_vtab, image, load_script
from vpeft.data.fgvc import FGVC, verify_fgvc
from vpeft.data.vtab import VtabDataset, VtabTask, verify_task

vtab_tool = load_script("datasets/vtab1k.py")
fgvc_tool = load_script("datasets/fgvc.py")

SMALL = VtabTask("tiny", "natural", 3, 2, train_size=4, val_size=2)  # a task table entry sized for the test


def good_task(folder):
    train, val = [0, 1, 2, 0], [1, 2]
    return fake_vtab(folder, {"train800": train, "val200": val, "train800val200": train + val, "test": [0, 2]})


def test_a_complete_folder_has_no_problems(tmp_path):
    assert verify_task(good_task(tmp_path / "tiny"), SMALL) == []


def test_verify_names_every_problem_of_a_broken_folder(tmp_path):
    folder = good_task(tmp_path / "tiny")
    (folder / "test.txt").unlink()  # 1: a list file missing
    (folder / "images" / "val200" / "000001.png").unlink()  # 2: an image missing
    with open(folder / "train800.txt", "a") as handle:  # 3: wrong count, 4: label out of range,
        handle.write("images/train800/000000.png 7\n")  # 5: a path listed twice, 6: union mismatch
    problems = verify_task(folder, SMALL)
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "test.txt: list file missing" in text
    assert "val200.txt: 1 image files missing, e.g. ['images/val200/000001.png']" in text
    assert "train800.txt: 5 entries, expected 4" in text
    assert "train800.txt: label 7 out of range for 3 classes" in text
    assert "train800.txt: 1 paths listed more than once" in text
    assert "train800val200.txt: labels differ from train800 + val200" in text


def test_verify_command_reports_each_task_and_exits_1(tmp_path, capsys):
    (tmp_path / "cifar100").mkdir()  # found under an alias, lists missing
    code = vtab_tool.main(["verify", "--root", str(tmp_path), "--tasks", "cifar,dtd"])
    out = capsys.readouterr().out
    assert code == 1
    assert "| cifar | natural | 100 | cifar100 | - | - | - | - | 5 problem(s) |" in out  # 4 lists + the alias
    assert "found under the alias 'cifar100'" in out
    assert "| dtd | natural | 47 | - |" in out and "none of the folders ['dtd']" in out
    assert "0/2 tasks complete" in out


def test_prepare_renames_aliases_and_rebuilds_the_union_list(tmp_path):
    download = tmp_path / "download" / "vtab-1k"
    train, val = [0, 1, 1, 0], [1, 0]
    fake_vtab(download / "oxford_pet", {"train800": train, "val200": val, "test": [1]})  # no train800val200
    notes = vtab_tool.prepare_task(download / "oxford_pet", tmp_path / "out" / "oxford_iiit_pet")
    assert notes and "rebuilt" in notes[0]
    assert vtab_tool.find_source(tmp_path / "download", SMALL) is None
    found = vtab_tool.find_source(tmp_path / "download", vtab_tool.resolve_task("pets"))
    assert found == download / "oxford_pet"  # one folder down, under an alias
    union = VtabDataset(tmp_path / "out" / "oxford_iiit_pet", "train800val200")
    assert union.targets == train + val and all(path.is_file() for path, _ in union.samples)
    assert (tmp_path / "out" / "oxford_iiit_pet" / "images").is_symlink()


def test_fgvc_verify_and_prepare_with_the_cars_path_remap(tmp_path, capsys):
    splits = tmp_path / "json" / "Stanford-cars"
    entries = {
        "train": {"car_ims/000001.jpg": 1, "car_ims/000002.jpg": 2},
        "val": {"car_ims/000003.jpg": 2},
        "test": {"car_ims/000004.jpg": 9, "car_ims/000005.jpg": 1},
    }
    splits.mkdir(parents=True)
    for split, content in entries.items():
        (splits / f"{split}.json").write_text(json.dumps(content))
    mirror = tmp_path / "mirror"  # the mirror keeps the ids, not the car_ims/ folder; 000005 is absent
    for i in range(1, 5):
        (mirror / ("train" if i < 3 else "test")).mkdir(parents=True, exist_ok=True)
        image(i).save(mirror / ("train" if i < 3 else "test") / f"{i:06d}.jpg")
    missing = fgvc_tool.prepare(FGVC["stanford_cars"], mirror, tmp_path / "json", tmp_path / "fgvc")
    assert missing == ["car_ims/000005.jpg"]
    folder = tmp_path / "fgvc" / "Stanford-cars"
    assert (folder / "car_ims" / "000003.jpg").resolve() == (mirror / "test" / "000003.jpg").resolve()
    problems = "\n".join(verify_fgvc(folder, FGVC["stanford_cars"]))
    assert "train.json: 2 images, expected 7329" in problems
    assert "test.json: class ids ['9'] do not occur in train.json" in problems
    assert "test.json: 1 image files missing" in problems and "000005.jpg" in problems
    fake_fgvc(tmp_path / "root" / "CUB_200_2011", {"train": {"a/x.jpg": "001"}})
    assert fgvc_tool.verify(tmp_path / "root", [FGVC["cub"]]) == 1
    out = capsys.readouterr().out
    assert "val.json: split file missing" in out and "0/1 datasets complete" in out
