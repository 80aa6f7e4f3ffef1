"""What the training loop asks of a task: datasets, a model, a loss and an evaluation.

``engine/train.py`` knows no task. It calls, for a run config ``cfg``::

    task = build_task(cfg)                           # TASKS[cfg.task](cfg)
    model, datasets = task.build()                   # backbone + head with pretrained weights, before any method
    loss = task.loss(net, task.to_device(batch, device))      # one micro-batch, a scalar: a mean over its terms
    task.loss_terms(batch)                           # how many terms that mean is over (1: the batch is one term)
    metrics = task.evaluate(model, loader, device, autocast, reduce)   # dict; metrics[task.metric]: higher is better
    task.method_options(cfg.method.options)          # the options apply_method gets (a task may scope targets)
    task.items(batch)                                # images in a batch (throughput)
    task.export(run_dir / "adapter")                 # files the task keeps beside the adapter

Batches are whatever the task's datasets and ``collate`` produce; ``to_device`` moves tensors in tuples, lists and
dicts. ``reduce`` sums a float64 tensor over data-parallel processes, so evaluation accumulates sums, not means.

A training step's loss is the mean over all the terms of its micro-batches in all processes: the engine weights each
micro-batch's ``loss`` by ``loss_terms(batch)`` over the step's total (summed over the micro-batches of
``optim.accumulate`` and over the processes before the first backward pass). The causal LM counts answer tokens, so
a step's loss and gradient are those of one process holding the whole global batch however the tokens fall on the
processes (the ``transformers`` Trainer's ``num_items_in_batch`` with ``average_tokens_across_devices``); the default
1 weighs every micro-batch alike (a mean of batch means, right where the batches are the same size).

``evaluate`` is one template for every task: eval mode (the previous mode restored afterwards, also after an error),
no gradients, each batch moved to the device and handed to the task's :meth:`Task.accumulate` under ``autocast``,
then :meth:`Task.summarise` turns what was accumulated into metrics with ``reduce``. A task writes only those two
hooks and :meth:`Task.start`, which makes the empty state of one evaluation.

A task whose metric is a share of items scored right (top-1, accuracy, exact match) also keeps, in its state, which
items it scored right, in evaluation order (:meth:`Task.hits`). ``evaluate(..., hits=[])`` fills the list: two models
scored on the same split can then be compared item by item (a paired test, V-PEFT-Bench's check), which sees a
smaller difference than two independent samples would allow. Only one process holds the whole split, so hits are
asked for in single-process evaluation only.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

Reduce = Callable[[Tensor], Tensor]


def _one_process(values: Tensor) -> Tensor:
    return values


class Task:
    """Base class; subclasses implement :meth:`build`, :meth:`loss` and the evaluation hooks :meth:`start`,
    :meth:`accumulate` and :meth:`summarise`."""

    metric: str = "top1"  # the validation metric that picks the best epoch
    collate: Callable[[list[Any]], Any] | None = None  # None: torch's default collate

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        """The model (pretrained weights loaded, no method yet) and the datasets by role (train, val, test)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model alone, for prediction on new inputs; by default built with the datasets (a class count may come
        from them), a task that can do without them overrides this."""
        return self.build()[0]

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """One batch's training loss: a scalar, the mean over its :meth:`loss_terms` terms."""
        raise NotImplementedError

    def loss_terms(self, batch: Any) -> int:
        """How many terms :meth:`loss` averages over in ``batch`` (read before the forward pass, so from the batch
        alone): the engine's weight of this micro-batch in its step. Default 1: each micro-batch counts alike."""
        return 1

    def method_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options the run's method is applied with: the config's, and what the task adds (the CLIP task scopes
        the targets to the towers it adapts); they are saved with the adapter, so a load rebuilds the same."""
        return options

    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
        reduce: Reduce | None = None,
        idle: Iterable[Any] = (),
        hits: list[bool] | None = None,
    ) -> dict[str, float]:
        """Metrics of ``model`` over ``loader``; ``reduce`` sums over data-parallel processes (None: one process).

        ``hits``: a list extended with the task's per-item hits in ``loader``'s order (:meth:`hits`; left empty by a
        task without them); one process only.

        ``idle``: batches run after ``loader`` and not counted. A model sharded by FSDP gathers its tensors in each
        forward pass, a collective that every process must join, so a process whose share of the split has fewer
        batches runs as many passes as the others (the engine hands it copies of a batch).
        """
        was_training = model.training
        model.eval()
        try:
            state, spare = self.start(model, device), None
            with torch.no_grad():
                for batch, counted in itertools.chain(((b, True) for b in loader), ((b, False) for b in idle)):
                    batch = self.to_device(batch, device)
                    if not counted and spare is None:
                        spare = self.start(model, device)
                    with autocast or contextlib.nullcontext():
                        self.accumulate(state if counted else spare, model, batch)
        finally:
            model.train(was_training)
        if hits is not None:
            if reduce is not None:
                raise ValueError("per-item hits are collected by one process holding the whole split (reduce=None)")
            hits.extend(self.hits(state) or ())
        return self.summarise(state, reduce or _one_process)

    def start(self, model: nn.Module, device: torch.device) -> Any:
        """The empty state of one evaluation (sums, records...), filled by :meth:`accumulate`."""
        raise NotImplementedError

    def accumulate(self, state: Any, model: nn.Module, batch: Any) -> None:
        """Add one batch (already on the device) to ``state``; runs without gradients, under the run's autocast."""
        raise NotImplementedError

    def summarise(self, state: Any, reduce: Reduce) -> dict[str, float]:
        """The metrics of the filled ``state``; ``reduce`` sums a tensor over the processes (identity with one)."""
        raise NotImplementedError

    def hits(self, state: Any) -> list[bool] | None:
        """Which items of the evaluation in ``state`` the model scored right, in order; None: the task's metric is
        no share of items (a Dice score, a mean AP)."""
        return None

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
