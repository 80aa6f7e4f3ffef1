"""Evaluation once: the Task.evaluate template, and a run directory evaluated by the engine (tools/test.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vpeft.engine import train as engine
from vpeft.engine.run_dir import open_run
from vpeft.errors import ConfigError, MissingFileError
from vpeft.tasks import Task

from .test_train import config


def test_test_tool_reproduces_the_training_runs_own_test_metrics(tmp_path):
    # bf16 autocast on the CPU: the tool must evaluate as training did (same autocast, loader and sums), not just
    # load the same weights, for the numbers to be equal
    summary = engine.train(config(tmp_path, "train.epochs=1", "train.amp=bf16"), tmp_path / "run")
    import tools.test as test_tool

    assert test_tool.main([str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    expected = {
        "split": "test",
        "test_size": summary["test_size"],
        **summary["test"],
        "test_hits": summary["test_hits"],
    }
    assert again == expected and len(again["test_hits"]) == summary["test_size"]  # the same items scored the same


class Probe(Task):
    """Records what each hook sees; ``fail_at`` raises in that batch."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(None)
        self.fail_at, self.seen = fail_at, []

    def start(self, model, device):
        return torch.zeros(2, dtype=torch.float64)

    def accumulate(self, state, model, batch):
        if len(self.seen) == self.fail_at:
            raise RuntimeError("boom")
        self.seen.append((model.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), batch["x"].dtype))
        state += torch.tensor([model(batch["x"]).sum().item(), len(batch["x"])], dtype=torch.float64)

    def summarise(self, state, reduce):
        total, count = reduce(state).tolist()
        return {"mean": total / count}


def test_template_runs_the_hooks_in_eval_mode_without_gradients_under_autocast():
    model = nn.Linear(3, 1).train()
    batches = [{"x": torch.ones(2, 3)}, {"x": 2 * torch.ones(1, 3)}]
    task = Probe()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    result = task.evaluate(model, batches, torch.device("cpu"), autocast, reduce=lambda t: 3 * t)
    assert task.seen == [(False, False, True, torch.float32)] * 2 and model.training
    with torch.no_grad():
        expected = (model(torch.ones(2, 3)).sum() + model(2 * torch.ones(1, 3)).sum()).item() / 3
    assert result["mean"] == pytest.approx(expected, rel=1e-2)  # bf16 matmuls; reduce scales both sums alike


def test_idle_batches_run_the_model_but_are_not_counted():
    # under FSDP a process with a smaller share of the split runs extra batches so its collectives match the others'
    model = nn.Linear(3, 1)
    batches = [{"x": torch.ones(2, 3)}, {"x": 2 * torch.ones(1, 3)}]
    plain, padded = Probe(), Probe()
    alone = plain.evaluate(model, batches, torch.device("cpu"))
    idle = [{"x": 5 * torch.ones(4, 3)}] * 2
    assert padded.evaluate(model, batches, torch.device("cpu"), idle=idle) == alone
    assert len(padded.seen) == 4 and len(plain.seen) == 2  # the idle ones ran, in eval mode without gradients
    assert padded.seen[2:] == [(False, False, False, torch.float32)] * 2


def test_template_restores_the_mode_after_an_error():
    model = nn.Linear(3, 1).train()
    with pytest.raises(RuntimeError, match="boom"):
        Probe(fail_at=1).evaluate(model, [{"x": torch.ones(1, 3)}] * 2, torch.device("cpu"))
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError, match="boom"):
        Probe(fail_at=0).evaluate(model, [{"x": torch.ones(1, 3)}], torch.device("cpu"))
    assert not model.training


def test_open_run_names_what_is_wrong(tmp_path):
    with pytest.raises(MissingFileError, match="not a run directory"):
        open_run(tmp_path / "nowhere")
    engine.train(config(tmp_path, "train.epochs=1", "train.max_steps=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match="'classification' run.*needs a 'medical_segmentation' run"):
        open_run(tmp_path / "run", data=False, task="medical_segmentation")
