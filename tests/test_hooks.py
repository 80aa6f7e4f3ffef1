"""The hooks later methods build on: calibration data, extra losses, per-step schedules, HF Conv1D layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import vpeft
from vpeft.core import AdapterModule, MethodConfig, Target
from vpeft.methods import METHODS

from .conftest import tiny_vit


@dataclass
class BusiestConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp.fc1",)


class Busiest(AdapterModule):
    """Test method: calibration picks the fc1 with the largest mean |activation|; adds a bias there."""

    Config = BusiestConfig
    wraps = ("linear",)
    mergeable = True
    needs_calibration = True

    def __init__(self, target: Target, config: BusiestConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.shift = nn.Parameter(torch.zeros(target.out_features))
        self.steps_seen = 0

    @classmethod
    def prepare(cls, config, model, targets, calibration):
        activity = {t.name: 0.0 for t in targets}
        hooks = [
            t.module.register_forward_hook(
                lambda m, i, o, n=t.name: activity.__setitem__(n, activity[n] + o.abs().mean())
            )
            for t in targets
        ]
        with torch.no_grad():
            for inputs, _ in calibration:
                model(inputs)
        for h in hooks:
            h.remove()
        return BusiestConfig(targets=(max(activity, key=activity.get),), head=config.head)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.shift

    def merged(self, weight, bias):
        return weight, bias + self.shift

    def unmerged(self, weight, bias):
        return weight, bias - self.shift

    @classmethod
    def loss(cls, config, layers, shared):
        return sum(layer.shift.pow(2).sum() for layer in layers)

    @classmethod
    def on_step(cls, config, layers, step, total_steps, optimizer=None):
        for layer in layers:
            layer.steps_seen = step


@pytest.fixture
def busiest():
    METHODS["busiest"] = Busiest
    yield
    del METHODS["busiest"]


def test_calibration_decides_once_and_the_decision_is_saved(busiest, tmp_path):
    base = tiny_vit()
    with torch.no_grad():
        base.blocks[1].mlp.fc1.weight.mul_(10)  # block 1 is the busy one
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(3)]
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "busiest", calibration=batches)
    assert [r[0] for r in report.rows] == ["blocks.1.mlp.fc1"]
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    assert [r[0] for r in vpeft.load_adapter(fresh, tmp_path / "a").rows] == ["blocks.1.mlp.fc1"]  # no data needed


def test_extra_loss_and_step_schedule_reach_the_active_layers(busiest):
    model = tiny_vit()
    vpeft.apply_method(model, "busiest", calibration=[(torch.randn(1, 3, 32, 32), None)])
    layer = vpeft.core.layers_of(model, "default")[0]
    with torch.no_grad():
        layer.shift.fill_(0.5)
    torch.testing.assert_close(vpeft.method_loss(model), torch.tensor(0.25 * layer.shift.numel()))
    vpeft.on_step(model, 7, 10)
    assert layer.steps_seen == 7
    assert vpeft.method_loss(tiny_vit_with("lora")) is None  # methods without a regulariser add nothing


def tiny_vit_with(method: str) -> nn.Module:
    model = tiny_vit()
    vpeft.apply_method(model, method)
    return model


def test_hf_conv1d_fused_projection_slices():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2Model(config).eval()
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "lora", r=2)
    assert [r[0] for r in report.rows] == [f"h.{i}.attn.c_attn[{p}]" for i in range(2) for p in "qv"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids).last_hidden_state
    reference = copy.deepcopy(base)  # the update written into Conv1D's (in, out) weight by hand
    for i in range(2):
        parts = model.h[i].attn.c_attn.adapters["default"]
        with torch.no_grad():
            for j, p in ((0, "q"), (2, "v")):
                delta = parts[p].scale * parts[p].lora_B @ parts[p].lora_A  # (out, in)
                reference.h[i].attn.c_attn.weight[:, 32 * j : 32 * (j + 1)] += delta.T
    torch.testing.assert_close(reference(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    vpeft.merge(model)
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
