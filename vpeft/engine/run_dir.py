"""A trained run read back from its directory: the config, the task, the model with the run's adapter, the datasets.

Reading a run never writes into its directory, so a shared or read-only run can be evaluated and used for
prediction. ``tools/predict.py`` uses it; ``tools/test.py`` rebuilds a run the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

import vpeft

from ..errors import ConfigError, MissingFileError
from ..tasks import Task
from .config import RunConfig, load_config
from .train import CLASSES, CONFIG, build_run

ADAPTER = "adapter"


class Run(NamedTuple):
    cfg: RunConfig
    task: Task
    model: nn.Module  # in eval mode, on the CPU, with the run's adapter loaded
    datasets: dict[str, Any]


def load_run(run_dir: str | os.PathLike, overrides: Sequence[str] = (), task: str | None = None) -> Run:
    """Rebuild the run in ``run_dir``: its ``config.yaml`` (with ``overrides``, e.g. ``data.test_split=val``), the
    task, its model with pretrained weights and the saved ``adapter/``, and its datasets.

    ``task`` names the task a tool expects; a run of another task is refused before anything is built.
    """
    run_dir = Path(run_dir)
    for needed in (CONFIG, ADAPTER):
        if not (run_dir / needed).exists():
            raise MissingFileError(
                f"{run_dir / needed} does not exist: {run_dir} is not a run directory, or its first epoch did not "
                "finish (tools/train.py writes config.yaml at the start and adapter/ after each epoch)."
            )
    cfg = load_config(run_dir / CONFIG, list(overrides))
    if task is not None and cfg.task != task:
        raise ConfigError(f"{run_dir} is a {cfg.task!r} run ({run_dir / CONFIG}, key task); this needs a {task!r} run.")
    run_task, model, datasets = build_run(cfg)
    vpeft.load_adapter(model, run_dir / ADAPTER)
    return Run(cfg, run_task, model.eval(), datasets)


def class_names(run_dir: str | os.PathLike, run: Run) -> list[str]:
    """The class names the run trained with: ``classes.json`` (saved by training), or for a run older than that
    file, the training dataset's own names."""
    saved = Path(run_dir) / CLASSES
    if saved.is_file():
        return [str(c) for c in json.loads(saved.read_text())]
    return [str(c) for c in run.datasets["train"].classes]
