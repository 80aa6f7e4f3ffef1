"""Segmentation through the generic training loop: a short run on a few shapes scenes fits them far above the
all-background baseline (it measures that the loop trains the model, not generalisation: docs/tasks.md has that)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.tasks.segmentation import confusion_matrix, scores

ROOT = Path(__file__).resolve().parents[2]

CONFIG = f"""
task: segmentation
model:
  name: vit_tiny_patch16_224
  img_size: 32
  kwargs: {{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}}
  pretrained: {ROOT / "checkpoints" / "vit_tiny_fmnist.safetensors"}
  head: {{name: upernet, indices: [1, 3], scales: [2.0, 0.5], channels: 32, neck_channels: 32}}
method:
  name: lora
  r: 4
data:
  name: shapes
  val_split: train
  test_split: train
  batch_size: 8
  num_workers: 0
  options: {{counts: {{train: 24}}, size: 32, seed: 1, scale: [1.0, 1.0], ratio: [1.0, 1.0]}}
optim:
  lr: 3.0e-3
  warmup_epochs: 0.5
train:
  epochs: 30
  seed: 0
  tensorboard: false
"""


def _config(tmp_path: Path, *overrides: str):
    path = tmp_path / "seg.yaml"
    path.write_text(CONFIG)
    return load_config(path, [f"data.root={tmp_path / 'shapes'}", *overrides])


def _all_background_miou(root: Path, split: str) -> float:
    """mIoU of predicting background everywhere, from the split's own masks."""
    masks = [
        torch.from_numpy(np.asarray(Image.open(p)).astype(np.int64))
        for p in (root / "annotations" / split).glob("*.png")
    ]
    target = torch.stack(masks)
    return scores(confusion_matrix(torch.zeros_like(target), target, 4))["mIoU"]


def test_short_run_fits_far_above_the_all_background_baseline(tmp_path, one_thread):
    summary = engine.train(_config(tmp_path), tmp_path / "run")
    baseline = _all_background_miou(tmp_path / "shapes", "train")
    assert 15 < baseline < 30  # background is most of the pixels; three classes with IoU 0
    assert summary["metric"] == "mIoU" and summary["task"] == "segmentation"
    best = summary["best_val"]["mIoU"]
    print(f"fitted mIoU {best:.1f} vs all-background {baseline:.1f}")
    assert best > baseline + 10, (best, baseline)
    assert set(summary["test"]) == {"loss", "mIoU", "mDice", "aAcc"}


def test_num_classes_must_agree_with_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="model.num_classes is 5 but dataset 'shapes' has 4 classes"):
        engine.build_run(_config(tmp_path, "model.num_classes=5"))
