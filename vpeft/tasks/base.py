"""What the training loop asks of a task: datasets, a model, a loss and an evaluation.

``engine/train.py`` knows no task. It calls, for a run config ``cfg``::

    task = build_task(cfg)                           # TASKS[cfg.task](cfg)
    model, datasets = task.build()                   # backbone + head with pretrained weights, before any method
    loss = task.loss(net, task.to_device(batch, device))      # one micro-batch, a scalar
    metrics = task.evaluate(model, loader, device, autocast, reduce)   # dict; metrics[task.metric]: higher is better
    task.items(batch)                                # images in a batch (throughput)
    task.export(run_dir / "adapter")                 # files the task keeps beside the adapter

Batches are whatever the task's datasets and ``collate`` produce; ``to_device`` moves tensors in tuples, lists and
dicts. ``reduce`` sums a float64 tensor over data-parallel processes, so ``evaluate`` accumulates sums, not means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

Reduce = Callable[[Tensor], Tensor]


class Task:
    """Base class; subclasses implement :meth:`build`, :meth:`loss` and :meth:`evaluate`."""

    metric: str = "top1"  # the validation metric that picks the best epoch
    collate: Callable[[list[Any]], Any] | None = None  # None: torch's default collate

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        """The model (pretrained weights loaded, no method yet) and the datasets by role (train, val, test)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: DataLoader,
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
        reduce: Reduce | None = None,
    ) -> dict[str, float]:
        raise NotImplementedError

    def export(self, adapter_dir: Path) -> None:
        """Write what the task keeps beside the saved adapter (e.g. the intensity rule a medical model needs)."""

    def items(self, batch: Any) -> int:
        """Images in a batch: the first dimension of its first tensor."""
        first = batch[0] if isinstance(batch, tuple | list) else batch
        return len(first)

    def calibration(self, batch: Any, device: torch.device) -> Callable[[nn.Module], Tensor]:
        """One calibration item for the methods that score on data (SPT): called with the model, it returns this
        task's training loss on ``batch``, moved to ``device`` only then (16 batches are not held on a GPU at once)."""
        return lambda model: self.loss(model, self.to_device(batch, device))

    @staticmethod
    def to_device(batch: Any, device: torch.device) -> Any:
        if isinstance(batch, Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: Task.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, tuple | list):
            return type(batch)(Task.to_device(v, device) for v in batch)
        return batch
