"""LoRA math against direct computations, and the VTAB-1k parameter count on ViT-B/16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft


def test_vtab_count_on_vit_b16(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "lora")
    assert report.trainable == 294_912  # 12 blocks x {q, v} x 8 x (768 + 768)
    assert report.head == 768 * 100 + 100


def randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def test_linear_slice_update_is_scaled_low_rank_product():
    layer = nn.Linear(6, 18)
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "lora", targets=["0[v]"], r=2, alpha=6.0, dropout=0.0, head=[])
    randomised(model)
    lora = model[0].adapters["default"]["v"]
    x = torch.randn(4, 6)
    weight = layer.weight.detach().clone()
    weight[12:] += (6.0 / 2) * lora.lora_B @ lora.lora_A  # only the v rows move
    torch.testing.assert_close(model(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_conv2d_update_keeps_stride_padding_dilation():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2)
    model = nn.Sequential(copy.deepcopy(conv))
    vpeft.apply_method(model, "lora", targets=["0"], r=2, dropout=0.0, head=[])
    randomised(model)
    lora = model[0].adapters["default"]["all"]
    delta = (lora.lora_B @ lora.lora_A.flatten(1)).view(5, 3, 3, 3) * lora.scale
    x = torch.randn(2, 3, 11, 11)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"supports groups=1.*groups=2"):
        vpeft.apply_method(model, "lora", targets=["0"], head=[])
    assert isinstance(model[0], nn.Conv2d)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_equals_attention_with_updated_projections(batch_first):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    model = nn.Sequential()
    model.add_module("attn", copy.deepcopy(mha))
    vpeft.apply_method(model, "lora", targets=["attn[q,v]", "attn.out_proj"], r=2, head=[])
    randomised(model)
    parts = model.attn.adapters["default"]
    reference = copy.deepcopy(mha)
    with torch.no_grad():
        for i, p in ((0, "q"), (2, "v")):
            reference.in_proj_weight[8 * i : 8 * (i + 1)] += parts[p].scale * parts[p].lora_B @ parts[p].lora_A
        reference.out_proj.weight += parts["out_proj"].scale * parts["out_proj"].lora_B @ parts["out_proj"].lora_A
    x = torch.randn(3, 5, 8)
    got = model.attn(x, x, x)[0]
    torch.testing.assert_close(got, reference(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_dropout_acts_on_the_lora_input_only_in_training():
    model = nn.Sequential(nn.Linear(8, 8))
    vpeft.apply_method(model, "lora", targets=["0"], dropout=0.5, head=[])
    randomised(model)
    x = torch.randn(64, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("alpha", [4.0, 12.0])  # r = 4: a scale of 1 (its multiply is skipped) and of 3
def test_linear_update_and_gradients_are_bit_identical_to_the_formula(alpha):
    layer = nn.Linear(10, 7)
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "lora", targets=["0"], r=4, alpha=alpha, dropout=0.0, head=[])
    randomised(model)
    lora = model[0].adapters["default"]["all"]
    x, grad = torch.randn(5, 10), torch.randn(5, 7)
    out = model(x)
    expected = layer(x) + (alpha / 4) * F.linear(F.linear(x, lora.lora_A), lora.lora_B)
    assert torch.equal(out, expected)
    params = (lora.lora_A, lora.lora_B)
    ours, reference = torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
