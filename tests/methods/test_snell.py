"""SNELL against direct computations: the update is the kernel matrix of the two factors (signed distances, computed
here by broadcasting, not ``cdist``) masked by the top-(1 - s) rule of ``torch.quantile`` and scaled by its detached
magnitude; the gradient treats that magnitude as a constant; merge is exact; s = 0 is the plain kernel; the
checkpointed branch keeps no dense (out, in) tensor for backward; and the count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import layers_of
from vpeft.errors import UserError
from vpeft.methods.snell import kept_mask

from ._two_layers import TwoLayers

R, HEADS, S, C = 4, 2, 0.5, 0.1


def adapted(**options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = TwoLayers()
    model = copy.deepcopy(base)
    options = {"targets": ("fc1", "fc2"), "r": R, "heads": HEADS, "sparsity": S, "dropout": 0.0, "head": (), **options}
    vpeft.apply_method(model, "snell", **options)
    return base, model


def kernel_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_h C (-1)^h ||b_o^(h) - a_i^(h)||_2`` for a (H, in, w), b (H, out, w): (out, in)."""
    diff = b[:, :, None, :] - a[:, None, :, :]  # (H, out, in, w)
    dist = diff.square().sum(-1).sqrt()
    signs = torch.tensor([(-1.0) ** h for h in range(a.shape[0])])
    return (C * signs[:, None, None] * dist).sum(0)


def update_by_hand(a: torch.Tensor, b: torch.Tensor, s: float = S) -> torch.Tensor:
    k = kernel_by_hand(a, b)
    mag = k.detach().abs()
    keep = mag > torch.quantile(mag.flatten(), s)
    return k * (mag * keep)


def test_the_update_is_the_kernel_matrix_masked_by_the_top_s_rule():
    base, model = adapted()
    l1, l2 = layers_of(model, "default")
    for layer, linear in ((l1, base.fc1), (l2, base.fc2)):
        a, b = layer.snell_A.detach(), layer.snell_B.detach()
        expected = update_by_hand(a, b)
        torch.testing.assert_close(layer.delta_weight().detach(), expected, rtol=1e-5, atol=1e-9)
        n = linear.weight.numel()
        assert int((expected != 0).sum()) == n - 1 - math.floor(S * (n - 1))  # the top share survives
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    w1 = base.fc1.weight + update_by_hand(l1.snell_A.detach(), l1.snell_B.detach())
    w2 = base.fc2.weight + update_by_hand(l2.snell_A.detach(), l2.snell_B.detach())
    expected = F.linear(torch.tanh(F.linear(x, w1, base.fc1.bias)), w2, base.fc2.bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model(x), base(x))  # random factors: not the identity at init
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    vpeft.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, base.fc1.weight, rtol=0, atol=1e-7)


def test_sparsity_zero_is_the_kernel_matrix_itself():
    _, model = adapted(sparsity=0.0)
    layer = layers_of(model, "default")[0]
    expected = kernel_by_hand(layer.snell_A.detach(), layer.snell_B.detach())
    torch.testing.assert_close(layer.delta_weight().detach(), expected, rtol=1e-5, atol=1e-9)
    assert bool((expected != 0).all())


@pytest.mark.parametrize("checkpointed", [True, False])
def test_the_gradient_treats_the_magnitude_as_a_constant(checkpointed):
    base, model = adapted(checkpoint=checkpointed)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(4))
    model(x).square().sum().backward()
    l1, l2 = layers_of(model, "default")
    a1, b1 = l1.snell_A.detach().clone().requires_grad_(), l1.snell_B.detach().clone().requires_grad_()
    w1 = base.fc1.weight.detach() + update_by_hand(a1, b1)
    w2 = base.fc2.weight.detach() + update_by_hand(l2.snell_A.detach(), l2.snell_B.detach())
    out = F.linear(torch.tanh(F.linear(x, w1, base.fc1.bias.detach())), w2, base.fc2.bias.detach())
    out.square().sum().backward()
    torch.testing.assert_close(l1.snell_A.grad, a1.grad, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(l1.snell_B.grad, b1.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(5, 7), (64, 48), (1, 9)])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.4, 0.5, 0.9, 0.995])
def test_the_order_statistic_keeps_what_the_quantile_keeps(shape, s):
    mag = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(kept_mask(mag, s), mag > torch.quantile(mag.flatten(), s))


def test_the_checkpointed_branch_keeps_no_dense_matrix_for_backward():
    """What autograd saves for backward during one forward: without the checkpoint the (out, in) kernel matrix and
    the (H, out, in) distances are among it; with it, nothing of that size (the base layers' own weights aside)."""
    sizes = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96))
        vpeft.apply_method(model, "snell", targets=("0",), r=R, dropout=0.0, checkpoint=checkpointed, head=())
        saved = []

        def pack(t: torch.Tensor, saved: list = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        x = torch.randn(3, 64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        sizes[checkpointed] = saved
    dense = 64 * 96
    assert max(sizes[False]) >= HEADS * dense  # the distances
    assert all(n < dense for n in sizes[True]), sizes[True]


def test_count_and_bad_options(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "snell")
    assert report.trainable == 12 * 32 * (4 * (768 + 768) + 2 * (768 + 3072)) == 5_308_416
    with pytest.raises(UserError, match="multiple of heads"):
        vpeft.apply_method(TwoLayers(), "snell", targets=("fc1",), r=5)
    with pytest.raises(UserError, match="sparsity"):
        vpeft.apply_method(TwoLayers(), "snell", targets=("fc1",), sparsity=1.0)


def test_bfloat16_layers_compute_the_kernel_in_float32():
    """cdist has no bfloat16 CPU kernel: the kernel is formed in float32, so a bf16 model trains and merges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24)).to(torch.bfloat16)
    vpeft.apply_method(model, "snell", targets=("0",), r=R, sparsity=S, dropout=0.0, head=())
    layer = layers_of(model, "default")[0]
    expected = update_by_hand(layer.snell_A.detach().float(), layer.snell_B.detach().float())
    torch.testing.assert_close(layer.delta_weight().detach(), expected, rtol=1e-5, atol=1e-9)
    x = torch.randn(3, 16).to(torch.bfloat16)
    model(x).float().sum().backward()
    assert layer.snell_A.grad.dtype == torch.bfloat16 and layer.snell_A.grad.abs().sum() > 0
    vpeft.merge(model)
    assert model[0].weight.dtype == torch.bfloat16
