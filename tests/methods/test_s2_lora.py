"""S2-LoRA against direct computations: ``h_l = W_l x + (alpha / r) B diag(lambda_l) A x`` with one trainable pair per
weight shape shared by its targets, the L1 penalty on the coefficients, and the parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import adapter_record, layers_of, shared_of
from vpeft.errors import UserError

from ..lm.models import tiny_llama

R, ALPHA = 3, 6.0


class ThreeLayers(nn.Module):  # fc2 and fc3 have one shape (5 x 5), fc1 another (5 x 6)
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def adapted(**options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = ThreeLayers()
    model = copy.deepcopy(base)
    options = {"targets": ("fc1", "fc2", "fc3"), "r": R, "alpha": ALPHA, "dropout": 0.0, "head": (), **options}
    vpeft.apply_method(model, "s2_lora", **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the coefficients away from zero, where every target is the identity
        for layer in layers_of(model, "default"):
            layer.s2_lambda.copy_(torch.randn(R, generator=g))
    return base, model


def test_output_is_the_shared_pair_through_each_target_s_coefficients():
    base, model = adapted()
    shared = shared_of(model, "default")
    pairs = {n: p.detach() for n, p in shared.named_parameters()}
    assert sorted(pairs) == ["A_5x5", "A_5x6", "B_5x5", "B_5x6"]  # two shapes, two pairs
    lambdas = [layer.s2_lambda.detach() for layer in layers_of(model, "default")]

    def layer(linear: nn.Linear, key: str, lam: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        delta = (ALPHA / R) * pairs[f"B_{key}"] @ torch.diag(lam) @ pairs[f"A_{key}"]
        return F.linear(h, linear.weight + delta, linear.bias)

    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    h = torch.tanh(layer(base.fc1, "5x6", lambdas[0], x))
    h = torch.tanh(layer(base.fc2, "5x5", lambdas[1], h))
    expected = layer(base.fc3, "5x5", lambdas[2], h)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model(x), base(x))
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_the_shared_pair_gets_the_sum_of_its_targets_gradients():
    """Weight tying by hand: fc2 and fc3 each get their own copy of the 5 x 5 pair; the shared pair's gradient is the
    sum of the copies' gradients."""
    base, model = adapted()
    shared = shared_of(model, "default")
    lambdas = [layer.s2_lambda.detach() for layer in layers_of(model, "default")]
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(4))
    model(x).square().sum().backward()

    copies = {k: [p.detach().clone().requires_grad_() for _ in range(3)] for k, p in shared.named_parameters()}

    def layer(linear: nn.Linear, key: str, i: int, h: torch.Tensor) -> torch.Tensor:
        delta = (ALPHA / R) * copies[f"B_{key}"][i] @ torch.diag(lambdas[i]) @ copies[f"A_{key}"][i]
        return F.linear(h, linear.weight + delta, linear.bias)

    h = torch.tanh(layer(base.fc2, "5x5", 1, torch.tanh(layer(base.fc1, "5x6", 0, x))))
    layer(base.fc3, "5x5", 2, h).square().sum().backward()
    for name, p in shared.named_parameters():
        used = [0] if name.endswith("5x6") else [1, 2]
        torch.testing.assert_close(p.grad, sum(copies[name][i].grad for i in used), rtol=1e-5, atol=1e-6)
    assert copies["A_5x5"][1].grad.abs().sum() > 0 and copies["A_5x5"][2].grad.abs().sum() > 0


def test_the_l1_penalty_is_the_sum_of_the_coefficients_absolute_values():
    _, model = adapted(sparsity=0.01)
    lambdas = [layer.s2_lambda for layer in layers_of(model, "default")]
    expected = 0.01 * sum(lam.detach().abs().sum().item() for lam in lambdas)
    penalty = vpeft.method_loss(model)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for lam in lambdas:
        torch.testing.assert_close(lam.grad, 0.01 * lam.detach().sign())
    _, model = adapted(sparsity=0.0)
    assert vpeft.method_loss(model) is None


def test_parameter_counts(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "s2_lora")
    assert report.trainable == 8 * (768 + 768) + 24 * 8 == 12_480  # one 768 x 768 pair, 24 coefficient vectors
    model = tiny_llama()  # q: 32 x 32, v: 16 x 32 (grouped), two blocks
    report = vpeft.apply_method(model, "s2_lora", head=())
    assert report.trainable == 8 * (32 + 32) + 8 * (32 + 16) + 4 * 8
    assert sorted(adapter_record(model).targets) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    ]


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="sparsity must be a finite number >= 0"):
        adapted(sparsity=-1.0)
    with pytest.raises(UserError, match="r=6 exceeds the rank"):
        adapted(r=6)
