"""HUT against direct computations: ``W' = W0 ⊙ (1 + (alpha / r) B A)``, the identity at init, an exact merge that
unmerges, zero entries of W0 that never change, and the count."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import layers_of
from vpeft.errors import UserError

from ..lm.models import batches, task_loss, tiny_gpt2
from ._two_layers import TwoLayers

R, ALPHA = 3, 6.0


def adapted() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = TwoLayers()
    with torch.no_grad():
        base.fc1.weight[0, :3] = 0.0  # entries the update must leave at zero
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "hut", targets=("fc1", "fc2"), r=R, alpha=ALPHA, dropout=0.0, head=())
    return base, model


def randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers_of(model, "default"):
            layer.hut_B.copy_(torch.randn(layer.hut_B.shape, generator=g))
    return model


def by_hand(base: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    l1, l2 = layers_of(model, "default")

    def weight(linear: nn.Linear, m: nn.Module) -> torch.Tensor:
        factor = 1 + (ALPHA / R) * m.hut_B.detach() @ m.hut_A.detach()
        return linear.weight * factor

    return F.linear(torch.tanh(F.linear(x, weight(base.fc1, l1), base.fc1.bias)), weight(base.fc2, l2), base.fc2.bias)


def test_the_output_is_the_base_weight_rescaled_element_wise():
    base, model = adapted()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0: the identity
    randomised(model)
    expected = by_hand(base, model, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model(x), base(x))
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.fc1.weight[0, :3], torch.zeros(3))  # W0 = 0 there: the update is correlated with W0
    vpeft.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, base.fc1.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_the_gradient_of_b_is_the_hand_computed_one():
    base, model = adapted()
    randomised(model)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(4))
    model(x).square().sum().backward()
    l1, l2 = layers_of(model, "default")
    a1, b1 = l1.hut_A.detach().clone().requires_grad_(), l1.hut_B.detach().clone().requires_grad_()
    w1 = base.fc1.weight.detach() * (1 + (ALPHA / R) * b1 @ a1)
    w2 = base.fc2.weight.detach() * (1 + (ALPHA / R) * l2.hut_B.detach() @ l2.hut_A.detach())
    out = F.linear(torch.tanh(F.linear(x, w1, base.fc1.bias.detach())), w2, base.fc2.bias.detach())
    out.square().sum().backward()
    torch.testing.assert_close(l1.hut_B.grad, b1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.hut_A.grad, a1.grad, rtol=1e-5, atol=1e-6)


def test_on_a_fused_conv1d_only_the_adapted_slices_change():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "hut", dropout=0.0, head=())
    randomised(model)
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().T  # (3 * 32, 32): q, k, v rows
    q, v = layers_of(model, "default")[:2]
    vpeft.merge(model)
    merged = model.transformer.h[0].attn.c_attn.weight.detach().T
    torch.testing.assert_close(merged[:32], w0[:32] * (1 + q.factor(w0.dtype)), rtol=1e-6, atol=1e-7)
    assert torch.equal(merged[32:64], w0[32:64])  # k untouched
    torch.testing.assert_close(merged[64:], w0[64:] * (1 + v.factor(w0.dtype)), rtol=1e-6, atol=1e-7)
    batch = batches(1)[0]
    assert torch.isfinite(task_loss(model, batch)[0])


def test_count_and_bad_options(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "hut")
    assert report.trainable == 2 * 12 * 8 * (768 + 768) == 294_912
    with pytest.raises(UserError, match="r=6 exceeds the rank"):
        vpeft.apply_method(TwoLayers(), "hut", targets=("fc1", "fc2"), r=6)
