"""configs/clip/real/: every dataset's config passes tools/train.py's checks without data or weights, and reads what
datasets/clip_fewshot.py prepares from a tiny fake download laid out as the real one (CoOp's DATASETS.md)."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from vpeft.backbones.open_clip import clip_data_config
from vpeft.core import build_config
from vpeft.engine.config import load_config
from vpeft.methods import METHODS
from vpeft.tasks import build_task
from vpeft.tasks.classification import image_datasets

from ..bench._helpers import ROOT, load_script

clip_fewshot = load_script("datasets/clip_fewshot.py")
REAL = ROOT / "configs" / "clip" / "real"
COOP = ["model.head.adapt=text", "model.head.templates=['X X X X X X X X X X X X X X X X {}.']", "method.name=coop"]


def test_one_config_per_dataset_of_the_prepare_tool():
    assert sorted(p.stem for p in REAL.glob("[!_]*.yaml")) == sorted(clip_fewshot.DATASETS)


EDITS = {
    "as-is": [],
    "4shot": ["data.train_split=train_4shot_seed2", "train.seed=2"],
    "coop": COOP,
    "lora-image": ["method.name=lora", "model.head.adapt=image"],
}


@pytest.mark.parametrize("name", sorted(clip_fewshot.DATASETS))
@pytest.mark.parametrize("edits", list(EDITS.values()), ids=list(EDITS))
def test_configs_validate_without_data_or_weights(name, edits):
    """What tools/train.py checks before it builds anything (the run config, the head's options, the method's
    options with the task's tower scoping), for the config as it is and with the edits _vit_b16.yaml documents."""
    cfg = load_config(REAL / f"{name}.yaml", edits)
    assert cfg.task == "clip_classification" and cfg.data.name == "folder"
    assert cfg.data.root == f"data/clip/{name}/all"
    task = build_task(cfg)
    adapt, templates = task.head_options()
    if cfg.method.name != "coop":
        assert list(templates) == [clip_fewshot.DATASETS[name][2]]  # CoOp's template, as the prepare tool records
    options = task.method_options(dict(cfg.method.options))
    config = build_config(METHODS[cfg.method.name].Config, options, cfg.method.name)
    assert adapt != "image" or r"text\..*" in config.exclude  # the image tower only: the text tower left out


def _image(path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)


def fake_download(name: str, src, classes: list[str], per_split=(4, 1, 2)) -> dict[str, int]:
    """``src`` as CoOp's DATASETS.md lays out dataset ``name`` (split file, FGVC-Aircraft's lists or ImageNet's
    folders with classnames.txt); returns the images per split."""
    split_file, image_dir, _ = clip_fewshot.DATASETS[name]
    counts = dict(zip(("train", "val", "test"), per_split, strict=True))
    if name == "imagenet":
        wnids = [f"n{i:08d}" for i in range(len(classes))]
        (src / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
        (src / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, classes, strict=True)))
        for label, wnid in enumerate(wnids):
            for i in range(counts["train"]):
                _image(src / image_dir / "train" / wnid / f"{wnid}_{i}.JPEG", label)
            for i in range(counts["test"]):
                _image(src / image_dir / "val" / wnid / f"val_{label}_{i}.JPEG", label)
        return {"train": counts["train"] * len(classes), "val": counts["test"] * len(classes),
                "test": counts["test"] * len(classes)}  # fmt: skip
    if name == "fgvc_aircraft":
        (src / image_dir).mkdir(parents=True, exist_ok=True)
        (src / "variants.txt").write_text("".join(f"{c}\n" for c in classes))
        number = 1000000
        for split, count in counts.items():
            lines = []
            for label, variant in enumerate(classes):
                for _ in range(count):
                    number += 1
                    _image(src / image_dir / f"{number}.jpg", label)
                    lines.append(f"{number} {variant}\n")
            (src / f"images_variant_{split}.txt").write_text("".join(lines))
        return {s: c * len(classes) for s, c in counts.items()}
    splits = {s: [] for s in counts}
    for label, class_name in enumerate(classes):
        for split, count in counts.items():
            for i in range(count):
                rel = f"{class_name.replace(' ', '_')}/{split}_{i}.jpg"
                _image(src / image_dir / rel, label)
                splits[split].append([rel, label, class_name])
    (src / split_file).write_text(json.dumps(splits))
    return {s: c * len(classes) for s, c in counts.items()}


@pytest.mark.parametrize("name", sorted(clip_fewshot.DATASETS))
def test_prepare_verify_and_the_config_reads_the_folders(name, tmp_path):
    classes = ["Boeing 707", "F-16A/B", "tench", "golden retriever", "Zebra"]  # a '/' as in FGVC-Aircraft
    counts = fake_download(name, tmp_path / "src", classes)
    out = tmp_path / "clip"
    argv = ["prepare", "--dataset", name, "--src", str(tmp_path / "src"), "--out", str(out), "--shots", "2"]
    assert clip_fewshot.main([*argv, "--seeds", "1"]) == 0
    assert clip_fewshot.main(["verify", "--root", str(out), "--dataset", name]) == 0
    manifest = json.loads((out / name / "manifest.json").read_text())
    assert manifest["counts"] == counts and manifest["template"] == clip_fewshot.DATASETS[name][2]

    size = clip_data_config(load_config(REAL / f"{name}.yaml").model.name.partition(":")[2])
    edits = [f"data.root={out / name / 'all'}", "data.train_split=train_2shot_seed1"]
    sets = image_datasets(load_config(REAL / f"{name}.yaml", edits), size)
    folders = sorted(c.replace("/", "_") for c in classes)
    assert {role: sorted(map(str, d.classes)) for role, d in sets.items()} == dict.fromkeys(sets, folders)
    assert len(sets["train"]) == 2 * len(classes) and len(sets["test"]) == counts["test"]
    assert tuple(sets["test"][0][0].shape) == (3, 224, 224)
    # base-to-novel: the first ceil(n/2) labels train, the rest are scored with the same config on other folders
    split = {}
    for part in ("base", "novel"):
        cfg = load_config(REAL / f"{name}.yaml", [f"data.root={out / name / part}", "data.train_split=train"])
        split[part] = set(map(str, image_datasets(cfg, size)["test"].classes))
    cut = math.ceil(len(classes) / 2)
    assert split == {"base": {c.replace("/", "_") for c in classes[:cut]},
                     "novel": {c.replace("/", "_") for c in classes[cut:]}}  # fmt: skip
