"""The core's calibration service and per-target init channel (issue 17): input covariances and weight gradients
against hand computations, gradients never all alive at once, the safetensors cache and its key, and
``Prepared`` handing each target its own state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vpeft
from vpeft.core import (
    AdapterModule,
    MethodConfig,
    Prepared,
    Target,
    add_adapter,
    cached,
    fingerprint,
    input_covariance,
    layers_of,
    weight_gradients,
)
from vpeft.errors import DataError

from .methods._two_layers import TwoLayers


def data(count: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 6, generator=g), torch.randint(0, 4, (2, 3), generator=g)) for _ in range(count)]


def loss_items(pairs):
    return [lambda model, x=x, y=y: nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in pairs]


@pytest.mark.parametrize("scale", ["none", "max"])
def test_input_covariance_is_the_mean_over_calls_of_xtx_in_float64(scale):
    torch.manual_seed(0)
    model = TwoLayers()
    pairs = data()
    got = input_covariance(model, {"fc1": model.fc1, "fc2": model.fc2}, loss_items(pairs), 10, "test", scale=scale)
    expected = {"fc1": 0, "fc2": 0}
    for x, _ in pairs:
        for name, inp in (("fc1", x), ("fc2", torch.tanh(model.fc1(x)))):
            X = inp.detach().reshape(-1, inp.shape[-1]).double()
            X = X / X.max().abs() if scale == "max" else X
            expected[name] = expected[name] + X.T @ X / len(pairs)
    for name in expected:
        assert got[name].dtype == torch.float64 and got[name].shape == expected[name].shape
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)


def test_input_covariance_limit_modes_and_a_module_never_reached():
    torch.manual_seed(0)
    model = TwoLayers().train()
    pairs = [(x.flatten(0, 1), y.flatten()) for x, y in data(5)]  # (inputs, labels) pairs: cross-entropy
    two = input_covariance(model, {"fc1": model.fc1}, pairs, 2, "test")
    x = torch.cat([p[0] for p in pairs[:2]]).double()
    torch.testing.assert_close(two["fc1"], x.T @ x / 2)
    assert model.training and model.fc1.training  # the modes it had
    unused = nn.Linear(6, 6)
    with pytest.raises(DataError, match="never reached"):
        input_covariance(model, {"unused": unused}, pairs, 2, "test")
    with pytest.raises(DataError, match="yielded no batch"):
        input_covariance(model, {"fc1": model.fc1}, [], 2, "test")


def test_weight_gradients_sum_the_per_item_gradients_and_free_each_at_once():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    model.fc2.bias.requires_grad_(False)
    pairs = data()
    params = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for item in loss_items(pairs):
        for n, g in zip(params, torch.autograd.grad(item(model), list(params.values())), strict=True):
            expected[n] += g
    alive = []

    def fold(total, grad, param):
        alive.append(sum(p.grad is not None for p in params.values()))  # gradients alive when one is folded
        total.add_(grad)

    model.fc1.weight.grad = marker = torch.ones_like(model.fc1.weight)
    sums, used = weight_gradients(model, params, loss_items(pairs), 10, "test", fold)
    assert used == 3 and max(alive) == 1 and len(alive) == 6
    for n in params:
        torch.testing.assert_close(sums[n], expected[n])
    assert model.fc1.weight.grad is marker and model.fc2.weight.grad is None  # the caller's gradients are back
    assert not model.fc2.bias.requires_grad and model.fc1.bias.requires_grad and not model.training


def test_fingerprint_tells_batches_apart_and_refuses_one_shot_iterators():
    a, b = data(2, seed=1), data(2, seed=2)
    assert fingerprint(loss_items(a)) == fingerprint(loss_items(a))
    assert fingerprint(loss_items(a)) != fingerprint(loss_items(b))
    assert fingerprint([{"input_ids": torch.arange(3)}]) != fingerprint([{"input_ids": torch.arange(4)}])
    assert fingerprint(iter(a)) is None and fingerprint([x for x in (1, 2)]) is not None


def test_cache_computes_once_per_key(tmp_path: Path):
    torch.manual_seed(0)
    model = TwoLayers()
    calls = []

    def compute(m=model):
        calls.append(1)
        return input_covariance(m, {"fc1": m.fc1}, pairs, 10, "test")

    pairs = loss_items(data())
    args = (str(tmp_path), "input_covariance", {"limit": 10}, model, pairs)
    first = cached(*args, compute)
    second = cached(*args, compute)
    assert len(calls) == 1 and torch.equal(first["fc1"], second["fc1"])
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left beside it
    assert torch.equal(load_file(str(files[0]))["fc1"], first["fc1"])
    cached(str(tmp_path), "input_covariance", {"limit": 9}, *args[3:], compute)  # other options
    cached(*args[:4], loss_items(data(seed=3)), compute)  # other data
    with torch.no_grad():
        model.fc2.bias.add_(1e-3)  # a tensor that fc1's input does not depend on still changes the key
    cached(*args, compute)  # other weights
    assert len(calls) == 4 and len(list(tmp_path.iterdir())) == 4
    cached(*args[:4], iter(pairs), compute)  # a one-shot iterator: computed, not stored
    assert len(calls) == 5 and len(list(tmp_path.iterdir())) == 4


# ---- Prepared: per-target state from prepare to each layer -----------------------------------------------------
@dataclass
class StampConfig(MethodConfig):
    targets: tuple[str, ...] = ("fc1", "fc2")


class Stamp(AdapterModule):
    """Adds a per-target vector that prepare computed (the target's out width times its position + 1)."""

    Config = StampConfig

    def __init__(self, target: Target, config: StampConfig, shared=None):
        super().__init__(target, config, shared)
        init = target.init if target.init is not None else torch.zeros(target.out_features)
        self.register_buffer("stamp", init.clone(), persistent=True)
        self.delta = nn.Parameter(torch.zeros(()))

    @classmethod
    def prepare(cls, config, model, targets, calibration):
        return Prepared(config, {t.key: torch.full((t.out_features,), float(i + 1)) for i, t in enumerate(targets)})

    def adapt_output(self, x, y):
        return y + self.stamp + self.delta


def test_prepared_state_reaches_each_target_and_a_rebuild_starts_without_it(tmp_path):
    model = TwoLayers()
    add_adapter(model, Stamp, "stamp", StampConfig(head=()))
    stamps = [layer.stamp for layer in layers_of(model, "default")]
    assert [s.tolist() for s in stamps] == [[1.0] * 5, [2.0] * 4]
    vpeft.core.delete_adapter(model, "default")
    add_adapter(model, Stamp, "stamp", StampConfig(head=()), prepared=True)  # a load: prepare does not run
    assert all(not layer.stamp.any() for layer in layers_of(model, "default"))


def test_prepared_state_for_a_non_target_is_refused():
    class Stray(Stamp):
        @classmethod
        def prepare(cls, config, model, targets, calibration):
            return Prepared(config, {"fc3": torch.zeros(1)})

    model = TwoLayers()
    with pytest.raises(ValueError, match="non-targets"):
        add_adapter(model, Stray, "stray", StampConfig(head=()))
    assert vpeft.core.adapter_names(model) == []
