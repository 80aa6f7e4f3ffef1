"""TLoRA against direct computations: the transform is the tensor-train matrix of its cores (Kronecker products summed
over the TT-rank paths, computed here with ``torch.kron``), the layer computes ``T W0 + (alpha / r) B A`` on a Linear
and on a Conv2d, the identity at init (with TT rank above 1 too, where the zero last core still gets a gradient),
exact merge and unmerge, and the count."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import layers_of
from vpeft.methods.tlora import balanced_factors

from ..lm.models import batches, task_loss, tiny_gpt2
from ._two_layers import TwoLayers

R, ALPHA = 2, 4.0


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers_of(model, "default"):
            for core in layer.tlora_cores:
                core.add_(0.3 * torch.randn(core.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))


def tt_matrix_by_hand(cores: list[torch.Tensor]) -> torch.Tensor:
    """``sum over rank paths of kron(G_1[a0, :, :, a1], ..., G_d[a_{d-1}, :, :, a_d])``."""
    ranks = [c.shape[0] for c in cores] + [cores[-1].shape[3]]
    total = 0
    for path in itertools.product(*(range(r) for r in ranks)):
        term = torch.ones(1, 1)
        for k, core in enumerate(cores):
            term = torch.kron(term, core[path[k], :, :, path[k + 1]])
        total = total + term
    return total


def expected_weight(layer: nn.Module, w0: torch.Tensor) -> torch.Tensor:
    t = tt_matrix_by_hand([c.detach() for c in layer.tlora_cores])
    residual = layer.scale * (layer.lora_B.detach() @ layer.lora_A.detach().flatten(1))  # alpha / r
    return (t @ w0.flatten(1) + residual).view(w0.shape)


@pytest.mark.parametrize(("n", "count"), [(768, 2), (576, 3), (7, 2), (32, 2), (16, 4), (1536, 1)])
def test_balanced_factors_multiply_to_the_width(n, count):
    factors = balanced_factors(n, count)
    assert len(factors) == count and math.prod(factors) == n
    assert balanced_factors(768, 2) == [24, 32]


@pytest.mark.parametrize(("cores", "rank"), [(2, 1), (3, 2), (2, 3)])
def test_the_linear_layer_is_the_transformed_weight_plus_the_residual(cores, rank):
    torch.manual_seed(0)
    base = TwoLayers(d_in=6, hidden=12, d_out=8)
    model = copy.deepcopy(base)
    options = dict(r=R, alpha=ALPHA, dropout=0.0, transform_cores=cores, transform_rank=rank, head=())
    vpeft.apply_method(model, "tlora", targets=("fc1", "fc2"), **options)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)  # T = I, B = 0
    randomise(model)
    l1, l2 = layers_of(model, "default")
    assert l1.dims == balanced_factors(12, cores) and l1.scale == ALPHA / R
    torch.testing.assert_close(l1.transform_matrix().detach(), tt_matrix_by_hand(list(l1.tlora_cores)).detach())
    w1, w2 = expected_weight(l1, base.fc1.weight), expected_weight(l2, base.fc2.weight)
    expected = F.linear(torch.tanh(F.linear(x, w1, base.fc1.bias)), w2, base.fc2.bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    vpeft.merge(model)
    torch.testing.assert_close(model.fc1.weight, w1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    vpeft.unmerge(model)
    torch.testing.assert_close(model.fc1.base_layer.weight, base.fc1.weight, rtol=1e-4, atol=1e-5)


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.tanh(self.c1(x)))


def test_on_conv2d_the_transform_mixes_output_channels():
    torch.manual_seed(0)
    base = TwoConvs()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "tlora", targets=("c1", "c2"), r=R, alpha=ALPHA, dropout=0.0, head=())
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)
    randomise(model)
    l1, l2 = layers_of(model, "default")
    w1, w2 = expected_weight(l1, base.c1.weight), expected_weight(l2, base.c2.weight)
    h = torch.tanh(F.conv2d(x, w1, base.c1.bias, padding=1))
    expected = F.conv2d(h, w2, base.c2.bias, stride=2)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    vpeft.unmerge(model)
    torch.testing.assert_close(model.c2.base_layer.weight, base.c2.weight, rtol=1e-4, atol=1e-5)


def test_with_tt_rank_above_one_every_core_gets_a_gradient_from_the_identity():
    torch.manual_seed(0)
    model = TwoLayers(d_in=6, hidden=12, d_out=8)
    vpeft.apply_method(model, "tlora", targets=("fc1",), r=R, dropout=0.0, transform_cores=3, transform_rank=2, head=())
    layer = layers_of(model, "default")[0]
    torch.testing.assert_close(layer.transform_matrix().detach(), torch.eye(12), rtol=0, atol=0)
    model(torch.randn(5, 6)).square().sum().backward()
    for core in layer.tlora_cores:
        assert core.grad is not None and core.grad.abs().sum() > 0
    last = layer.tlora_cores[-1].grad
    assert last[1:].abs().sum() > 0  # the zero rank paths of the last core are no saddle


def test_on_a_fused_conv1d_each_slice_gets_its_own_transform():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "tlora", dropout=0.0, head=())
    randomise(model)
    w0 = base.transformer.h[0].attn.c_attn.weight.detach().T  # (3 * 32, 32): q, k, v rows
    q, v = layers_of(model, "default")[:2]
    vpeft.merge(model)
    merged = model.transformer.h[0].attn.c_attn.weight.detach().T
    torch.testing.assert_close(merged[:32], expected_weight(q, w0[:32]), rtol=1e-5, atol=1e-5)
    assert torch.equal(merged[32:64], w0[32:64])  # k untouched
    torch.testing.assert_close(merged[64:], expected_weight(v, w0[64:]), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(task_loss(model, batches(1)[0])[0])


def test_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "tlora")
    assert report.trainable == 2 * 12 * (24**2 + 32**2 + 8 * (768 + 768)) == 333_312


def test_bfloat16_merges_and_unmerges():
    """There is no bfloat16 LU on the CPU: unmerge solves in float32 and casts back."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24)).to(torch.bfloat16)
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "tlora", targets=("0",), r=R, dropout=0.0, head=())
    randomise(model)
    x = torch.randn(3, 16).to(torch.bfloat16)
    before = model(x)
    vpeft.merge(model)
    torch.testing.assert_close(model(x), before, rtol=5e-2, atol=5e-2)
    vpeft.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, rtol=5e-2, atol=2e-2)
