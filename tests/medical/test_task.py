"""The medical_segmentation task end to end on MONAI's synthetic data, and its config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import vpeft
from tools.predict_medical import predict
from vpeft.engine.config import load_config
from vpeft.engine.train import build_run, train
from vpeft.medical import Preprocessing

BACKBONE = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _config(tmp_path: Path, data: dict, model: dict | None = None, **sections) -> Path:
    cfg = {
        "task": "medical_segmentation",
        "model": {"name": "vit_tiny_patch16_224", "img_size": 32, "kwargs": BACKBONE, **(model or {})},
        "method": {"name": "lora", "r": 4},
        "data": {
            "name": "synthetic", "root": str(tmp_path / "data"), "train_split": "training", "val_split": None,
            "test_split": "test", "batch_size": 8, "num_workers": 0, "options": data,
        },
        "optim": {"lr": 5.0e-3},
        "train": {"epochs": 1, "seed": 0, "tensorboard": False, "log_every": 1},
        **sections,
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SYNTH_2D = {"spatial_dims": 2, "counts": {"training": 16, "test": 4}, "size": 32, "noise": 0.2}


def test_short_fine_tune_raises_dice(tmp_path):
    options = {"synthetic": SYNTH_2D, "spatial_dims": 2, "modality": "MR"}
    head = {"head": {"name": "unetr", "feature_size": 8}}
    cfg = load_config(_config(tmp_path, options, head, train={"epochs": 4, "seed": 0, "tensorboard": False}))
    task, model, datasets = build_run(cfg)
    vpeft.apply_method(model, "lora", r=4)
    loader = task.collate([datasets["test"][i] for i in range(len(datasets["test"]))])
    before = task.evaluate(model, [loader], torch.device("cpu"))["dice"]
    summary = train(cfg, tmp_path / "run")
    after = summary["test"]["dice"]
    print(f"dice before {before:.3f} after {after:.3f}")
    assert after > before + 0.1, (before, after)
    assert set(summary["test"]) >= {"dice_class1", "dice_class2", "hd95", "nsd"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["metric"] == "dice"
    assert Preprocessing.load(tmp_path / "run" / "adapter") == task.preprocessing  # written with the adapter
    # inference on a new file: the run's preprocessing is stored beside the adapter and the prediction keeps the grid
    image = tmp_path / "data" / "imagesTr" / "case_016.nii.gz"
    (out,) = predict(tmp_path / "run", [str(image)], tmp_path / "pred")
    assert Preprocessing.load(tmp_path / "run" / "adapter") == task.preprocessing
    saved, source = nib.load(str(out)), nib.load(str(image))
    np.testing.assert_allclose(saved.affine, source.affine)
    assert saved.shape == source.shape and set(np.unique(np.asarray(saved.dataobj))) <= {0, 1, 2}


def test_3d_patches_with_sliding_window(tmp_path):
    synth = {"spatial_dims": 3, "counts": {"training": 2, "test": 1}, "size": 32, "depth": 10}
    options = {"synthetic": synth, "mode": "3d", "patch": [32, 32, 8], "samples_per_volume": 1, "modality": "MR"}
    cfg = load_config(_config(tmp_path, options, {"head": {"name": "unetr", "feature_size": 4}}))
    summary = train(cfg, tmp_path / "run")
    assert 0.0 <= summary["test"]["dice"] <= 1.0 or math.isnan(summary["test"]["dice"])


def test_prompted_sam_head_trains_a_step(tmp_path):
    options = {"synthetic": SYNTH_2D, "spatial_dims": 2}
    head = {
        "head": {"name": "sam", "prompt": "box+points", "negative": 1, "embed_dim": 16, "num_heads": 2, "mlp_dim": 32}
    }
    cfg = load_config(_config(tmp_path, options, head, train={"epochs": 1, "max_steps": 1, "tensorboard": False}))
    summary = train(cfg, tmp_path / "run")
    assert summary["steps"] == 1 and summary["test"]["dice"] >= 0.0


@pytest.mark.parametrize(
    ("data", "model", "message"),
    [
        ({"modality": "CT"}, None, "modality CT needs data.options.window"),
        ({"mode": "3d"}, None, "mode 3d needs 3-D data, model.head.name unetr and data.options.patch"),
        ({"windw": 3}, None, "data.options.windw: Extra inputs are not permitted"),
        ({}, {"head": {"name": "sam", "prompt": "clicks"}}, "model.head.prompt"),
        ({}, {"head": {"name": "sam", "prompt": "points", "positive": 0}}, "model.head.positive must be >= 1"),
    ],
)
def test_config_errors(tmp_path, data, model, message):
    cfg = load_config(_config(tmp_path, data, model))
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_run(cfg)


def test_missing_class_list(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"training": [], "test": []}))
    cfg = load_config(_config(tmp_path, {"spatial_dims": 2}))
    with pytest.raises(ValueError, match="no class list"):
        build_run(cfg)
