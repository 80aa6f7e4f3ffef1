"""tools/compare.py shows each run's own headline metric, the one its Task class names."""

from __future__ import annotations

import importlib
import json

from vpeft.tasks import TASKS


def metric_of(task: str) -> str:
    """The metric a Task class names (the dense tasks are registered as lazy builders: import the class)."""
    entry = TASKS[task]
    if isinstance(entry, type):
        return entry.metric
    module = {"segmentation": "segmentation", "detection": "detection", "medical_segmentation": "medical"}[task]
    return getattr(importlib.import_module(f"vpeft.tasks.{module}"), entry.__qualname__).metric

TEST_METRICS = {  # the keys each task's evaluate() returns, with distinct values
    "classification": {"loss": 0.31, "top1": 91.64, "top5": 99.5},
    "segmentation": {"loss": 0.8, "mIoU": 45.03, "mDice": 58.2, "aAcc": 81.7},
    "detection": {"loss": 1.2, "map": 12.5, "map_50": 42.8, "map_75": 9.1},
    "medical_segmentation": {"dice": 0.7312, "hd95": 4.2, "nsd": 0.81},
}


def test_headline_metric_of_every_task(tmp_path, capsys):
    import tools.compare as compare

    runs = []
    for i, (task, test) in enumerate(TEST_METRICS.items()):
        run = tmp_path / task
        run.mkdir()
        summary = {"task": task, "metric": metric_of(task), "test": test, "method": "lora", "wall_seconds": 12.0,
                   "trainable_params": 1000 + i, "trainable_params_with_head": 2000 + i}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "config.yaml").write_text(f"task: {task}\n")  # what makes it a run directory
        runs.append(str(run))
    old = tmp_path / "before_tasks"  # summaries written before tasks existed have no task and no metric
    old.mkdir()
    (old / "config.yaml").write_text("model: {name: vit_tiny_patch16_224}\n")
    (old / "summary.json").write_text(json.dumps({"test": TEST_METRICS["classification"], "method": "linear",
                                                  "trainable_params": 7, "trainable_params_with_head": 8,
                                                  "wall_seconds": 1.0}))  # fmt: skip
    assert compare.main([*runs, str(old)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    expected = {"classification": "top1 91.64", "segmentation": "mIoU 45.03", "detection": "map 12.5",
                "medical_segmentation": "dice 0.7312"}  # fmt: skip
    for line, (task, shown) in zip(lines[:4], expected.items(), strict=True):
        assert line.split()[1] == task and f" {shown} " in line
    assert lines[-1].split()[1] == "classification" and " top1 91.64 " in lines[-1]
