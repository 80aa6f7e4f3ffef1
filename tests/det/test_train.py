"""Detection through the generic training loop on the offline shapes: mAP@50 rises far above a prior-box baseline.

A memorisation check (validation on the 16 training scenes): it proves that data, detector, loss, adapter and
evaluation fit together and learn within a test's budget; the generalising run is in docs/tasks.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vpeft.data.coco import CocoDetection
from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.tasks.detection import coco_map

ROOT = Path(__file__).resolve().parents[2]

CONFIG = f"""
task: detection
model:
  name: vit_tiny_patch16_224
  img_size: 32
  kwargs: {{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}}
  pretrained: {ROOT / "checkpoints" / "vit_tiny_fmnist.safetensors"}
  head: {{name: fcos, out_channels: 32, scales: [2.0, 1.0, 0.5]}}
method:
  name: lora
  r: 8
data:
  name: shapes
  val_split: train
  test_split: train
  batch_size: 8
  num_workers: 0
  options: {{counts: {{train: 16}}, size: 32, seed: 3, flip: 0.0}}
optim:
  lr: 2.0e-3
  warmup_epochs: 0.5
train:
  epochs: 30
  eval_every: 30
  seed: 0
  tensorboard: false
"""


def prior_box_baseline(dataset: CocoDetection) -> dict[str, float]:
    """mAP of predicting, in every image, each class's mean box (from the same scenes) with score 1."""
    truths = [{k: dataset[i][1][k] for k in ("boxes", "labels", "iscrowd", "area")} for i in range(len(dataset))]
    boxes, labels = torch.cat([t["boxes"] for t in truths]), torch.cat([t["labels"] for t in truths])
    classes = torch.arange(1, dataset.num_classes + 1)
    mean = torch.stack([boxes[labels == c].mean(dim=0) for c in classes])  # (K, 4)
    guess = {"boxes": mean, "scores": torch.ones(len(classes)), "labels": classes}
    return coco_map([(i, guess, t) for i, t in enumerate(truths)])


def test_short_run_beats_the_prior_box_baseline(tmp_path, one_thread):
    path = tmp_path / "det.yaml"
    path.write_text(CONFIG)
    summary = engine.train(load_config(path, [f"data.root={tmp_path / 'shapes'}"]), tmp_path / "run")
    root = tmp_path / "shapes"
    baseline = prior_box_baseline(CocoDetection(root / "images" / "train", root / "instances_train.json"))
    assert summary["task"] == "detection" and summary["metric"] == "map"
    assert baseline["map_50"] < 10, baseline
    # measured after these 60 steps (FCOS, lr 2e-3), train.seed 0-4: 28.5, 58.8, 31.9, 40.0, 29.0 against 0.18 for
    # the prior boxes (at lr 5e-3 one seed in five stayed near 2: too high a rate for a test)
    assert summary["test"]["map_50"] > baseline["map_50"] + 15, (summary["test"], baseline)


def test_num_classes_must_agree_with_the_dataset(tmp_path):
    path = tmp_path / "det.yaml"
    path.write_text(CONFIG)
    cfg = load_config(path, [f"data.root={tmp_path / 'shapes'}", "model.num_classes=5"])
    with pytest.raises(ValueError, match="model.num_classes is 5 but detection dataset 'shapes' has 3 categories"):
        engine.build_run(cfg)


def test_spt_scores_the_detector_with_its_own_loss(tmp_path, one_thread):
    """SPT's sensitivity pass runs the task's training loss (the detector's summed loss dict) on calibration batches;
    a classifier's cross-entropy on ``model(images)`` cannot be computed for a detector."""
    path = tmp_path / "det.yaml"
    path.write_text(CONFIG)
    scores = tmp_path / "scores.safetensors"
    overrides = [f"data.root={tmp_path / 'shapes'}", "method.name=spt_lora", "method.param_budget=0.01",
                 f"method.sensitivity_file={scores}", "data.calibration_batches=2", "train.epochs=1"]  # fmt: skip
    summary = engine.train(load_config(path, overrides), tmp_path / "run")
    # the plan total closest to the 0.01M budget: within one rank-8 LoRA on a 96-wide matrix (1,536) plus its sparse
    # entries
    assert abs(summary["trainable_params"] - 10_000) < 2_000
    from safetensors.torch import load_file

    table = load_file(scores)
    assert table and all(torch.isfinite(s).all() for s in table.values())
    assert sum(float(s.sum()) for s in table.values()) > 0  # the loss reached the scored weights
