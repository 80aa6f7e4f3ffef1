"""DoRA: magnitude init, the forward against the paper's formula, the detached norm, merge/unmerge, ViT-B/16 count."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of

from ..conftest import tiny_vit


def one_linear(bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(16, 12, bias=bias))).eval()


def randomise(layer) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def expected_weight(layer, w0: torch.Tensor) -> torch.Tensor:
    w = w0 + layer.scale * layer.lora_B @ layer.lora_A
    return layer.magnitude[:, None] * w / torch.sqrt((w * w).sum(dim=1, keepdim=True))


def test_magnitude_is_row_norm_of_base_weight():
    model = tiny_vit()
    w = model.blocks[0].attn.qkv.weight.detach().clone()
    vpeft.apply_method(model, "dora")
    q, v = layers_of(model, "default")[:2]
    torch.testing.assert_close(q.magnitude, torch.linalg.vector_norm(w[:64], dim=1))
    torch.testing.assert_close(v.magnitude, torch.linalg.vector_norm(w[128:], dim=1))
    assert not q.lora_B.any()


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_formula(bias):
    model = one_linear(bias)
    base = copy.deepcopy(model)
    vpeft.apply_method(model, "dora", targets=("fc",), head=(), r=4, alpha=8.0)
    layer = layers_of(model, "default")[0]
    randomise(layer)
    x = torch.randn(5, 16)
    w = expected_weight(layer, base.fc.weight)
    torch.testing.assert_close(model(x), F.linear(x, w, base.fc.bias), rtol=1e-5, atol=1e-5)


def test_fused_slice_changes_only_its_rows(images):
    model = tiny_vit()
    base = copy.deepcopy(model)
    vpeft.apply_method(model, "dora", targets=("attn.qkv[k]",))
    layer = layers_of(model, "default")[0]
    randomise(layer)
    x = torch.randn(2, 17, 64)
    w0, b0 = base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias
    w = torch.cat([w0[:64], expected_weight(layer, w0[64:128]), w0[128:]])
    torch.testing.assert_close(model.blocks[0].attn.qkv(x), F.linear(x, w, b0), rtol=1e-5, atol=1e-5)


def test_norm_is_detached_in_backward():
    model = one_linear()
    base = copy.deepcopy(model)
    vpeft.apply_method(model, "dora", targets=("fc",), head=(), r=4, dropout=0.0)
    layer = layers_of(model, "default")[0]
    randomise(layer)
    x = torch.randn(5, 16)
    model(x).pow(2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    m = layer.magnitude.detach().clone().requires_grad_(True)
    w = base.fc.weight + layer.scale * B @ A
    norm = torch.linalg.vector_norm(w, dim=1).detach()  # the paper's section 4.3 constant
    F.linear(x, (m / norm)[:, None] * w, base.fc.bias).pow(2).sum().backward()
    for ours, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, m)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_merge_and_unmerge_weights():
    model = one_linear()
    base = copy.deepcopy(model)
    vpeft.apply_method(model, "dora", targets=("fc",), head=(), r=4)
    layer = layers_of(model, "default")[0]
    randomise(layer)
    w = expected_weight(layer, base.fc.weight).detach()
    vpeft.merge(model)
    torch.testing.assert_close(model.fc.weight, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.fc.bias, base.fc.bias, rtol=0, atol=0)
    vpeft.unmerge(model)
    torch.testing.assert_close(model.fc.base_layer.weight, base.fc.weight, rtol=1e-5, atol=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="dora option r"):
        vpeft.apply_method(tiny_vit(), "dora", r=0)
    with pytest.raises(ValueError, match="dora option dropout"):
        vpeft.apply_method(tiny_vit(), "dora", dropout=1.0)


def test_vit_b16_count(vit_b16):
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "dora").trainable == 12 * 2 * (8 * 768 + 768 * 8 + 768)
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "dora", targets=("qkv",)).trainable == 322_560
