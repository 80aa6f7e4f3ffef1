"""Tasks: what a run trains for. ``TASKS`` maps the config's ``task`` to a :class:`Task` class."""

from __future__ import annotations

from typing import Any

from ..registry import lookup
from .base import Task
from .classification import ClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
}


def build_task(cfg: Any) -> Task:
    return lookup(TASKS, cfg.task, "task")(cfg)


__all__ = ["TASKS", "Task", "build_task"]
