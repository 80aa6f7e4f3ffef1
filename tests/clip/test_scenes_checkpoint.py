"""The committed tiny CLIP (tools/pretrain_clip.py): zero-shot on colour-shape pairs no caption named, through the
task as a run config builds it."""

from __future__ import annotations

from pathlib import Path

import torch

from vpeft.data import build_loader
from vpeft.engine.config import load_config
from vpeft.engine.train import build_run

ROOT = Path(__file__).resolve().parents[2]


def test_zero_shot_on_held_out_pairs_is_far_above_chance(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names the model config and the checkpoint relative to the repository
    sets = ["data.options.classes=held_out", "data.options.style=clean", "data.options.test_per_class=20"]
    task, model, datasets = build_run(load_config("configs/clip/_scenes_b2n.yaml", sets))
    assert datasets["test"].classes == ["red circle", "green square", "blue triangle", "yellow cross",
                                        "purple circle", "orange square"]  # fmt: skip
    top1 = task.evaluate(model, build_loader(datasets["test"], 120, train=False, num_workers=0), torch.device("cpu"))
    assert top1["top1"] > 3 * 100 / 6  # chance is 16.7%; the tool measured 95.0% on 50 per class
