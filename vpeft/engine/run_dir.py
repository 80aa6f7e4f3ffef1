"""A trained run read back from its directory: the one way tools rebuild what a run trained.

:func:`open_run` reads ``config.yaml``, rebuilds the task and its model exactly as :func:`~vpeft.engine.train.train`
built them (seeded first, so a backbone without a pretrained file gets the same random weights) and loads
``adapter/``. :func:`evaluate_run` then evaluates one split with the loader, autocast and data-parallel sums that
training used for its own test metrics, so on the same machine it reproduces them (``tools/test.py``).
``tools/predict.py`` and ``tools/predict_medical.py`` open a run to predict new files. Reading a run never writes
into its directory, so a shared or read-only run can be evaluated and used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import vpeft

from ..errors import ConfigError, MissingFileError
from ..tasks import Task, build_task
from . import distributed
from .config import RunConfig, load_config
from .train import CLASSES, CONFIG, _autocast, build_run, evaluate_split, seed_everything

ADAPTER = "adapter"


@dataclass
class Run:
    """A reopened run: its config, task, model (adapter loaded, in eval mode, on the CPU) and datasets by role."""

    cfg: RunConfig
    task: Task
    model: nn.Module
    datasets: dict[str, Any]


def open_run(
    run_dir: str | os.PathLike, overrides: Sequence[str] = (), data: bool = True, task: str | None = None
) -> Run:
    """The run in ``run_dir`` with its saved adapter loaded.

    ``overrides`` are ``--set``-style ``key=value`` edits of the saved config (``data.test_split=val``). With
    ``data=False`` only the model is built (:meth:`Task.build_model`), for predicting files outside the datasets.
    ``task`` names the task the run must be; another one is refused before anything is built.
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
    if data:
        run_task, model, datasets = build_run(cfg)
    else:
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # as build_run: the same random backbone
        run_task = build_task(cfg)
        model, datasets = run_task.build_model(), {}
    vpeft.load_adapter(model, run_dir / ADAPTER)
    return Run(cfg, run_task, model.eval(), datasets)


def class_names(run_dir: str | os.PathLike, run: Run) -> list[str]:
    """The class names the run trained with: ``classes.json`` (saved by training), or for a run older than that
    file, the training dataset's own names."""
    saved = Path(run_dir) / CLASSES
    if saved.is_file():
        return [str(c) for c in json.loads(saved.read_text())]
    return [str(c) for c in run.datasets["train"].classes]


def evaluate_run(run_dir: str | os.PathLike, split: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``{"split": ..., "test_size": items, **metrics}`` of the run's adapter on ``split`` (default: the config's
    test split), the saved config edited by ``overrides`` first (``data.options.classes=novel``: the same adapter
    scored on other classes, as the base-to-novel protocol does).

    Runs on ``train.device`` with the run's ``train.amp`` autocast; under ``torchrun`` each process evaluates its
    share and the sums are added over the processes, as in training. In one process, a task that scores items one by
    one adds ``test_hits`` ("1"/"0" per item in the split's order, as the training summary does).
    """
    run = open_run(run_dir, [*overrides, *([f"data.test_split={split}"] if split else [])])
    if "test" not in run.datasets:
        raise ConfigError(f"{Path(run_dir) / CONFIG}: data.test_split is not set; pass the split to evaluate.")
    dist = distributed.setup(run.cfg.train.device)
    try:
        run.model.to(dist.device)
        autocast = _autocast(run.cfg.train.amp, dist.device)
        hits: list[bool] | None = [] if dist.world == 1 else None  # one process holds the whole split
        metrics = evaluate_split(run.cfg, run.task, run.model, run.datasets["test"], dist, autocast, hits)
    finally:
        dist.close()
    out = {"split": run.cfg.data.test_split, "test_size": len(run.datasets["test"]), **metrics}
    if hits:
        out["test_hits"] = "".join("1" if h else "0" for h in hits)
    return out
