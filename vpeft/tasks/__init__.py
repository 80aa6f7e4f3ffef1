"""Tasks: what a run trains for. ``TASKS`` maps the config's ``task`` to a :class:`Task` class or builder.

Only classification is imported eagerly; the dense and text tasks import their libraries (torchmetrics,
torchvision's detectors, MONAI, transformers) when a run asks for them, so those stay optional extras.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..registry import lookup
from .base import Task
from .classification import ClassificationTask


def _lazy(module: str, name: str) -> Callable[[Any], Task]:
    def build(cfg: Any) -> Task:
        return getattr(importlib.import_module(module, __package__), name)(cfg)

    build.__qualname__ = name
    return build


TASKS: dict[str, Callable[[Any], Task]] = {
    "classification": ClassificationTask,
    "segmentation": _lazy(".segmentation", "SegmentationTask"),
    "detection": _lazy(".detection", "DetectionTask"),
    "medical_segmentation": _lazy(".medical", "MedicalSegmentationTask"),
    "text_classification": _lazy(".text_classification", "TextClassificationTask"),
    "causal_lm": _lazy(".causal_lm", "CausalLMTask"),
}


def build_task(cfg: Any) -> Task:
    return lookup(TASKS, cfg.task, "task")(cfg)


__all__ = ["TASKS", "Task", "build_task"]
