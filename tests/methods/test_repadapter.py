"""RepAdapter: the grouped adapter against a hand-built dense map, merge equal to the unmerged output and to
W (I + s G), exact unmerge, ViT-B/16 count."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import layers_of

from ..conftest import tiny_vit


def perturbed(**options):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "repadapter", **options)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, model.eval()


def dense_up(up: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped 1x1 conv as a (d, h) matrix: output channel o reads hidden channels of group o // (d / groups)."""
    d, hg = up.shape
    out = torch.zeros(d, hg * groups)
    for o in range(d):
        k = o // (d // groups)
        out[o, k * hg : (k + 1) * hg] = up[o]
    return out


def test_adapted_input_by_hand():
    base, model = perturbed(scale=2.0)
    ad = model.blocks[0].attn.qkv.adapters["default"]["all"]
    x = torch.randn(2, 5, 64)
    z = F.linear(x, ad.down, ad.down_bias)
    x_adapted = x + 2.0 * (z @ dense_up(ad.up, 2).T + ad.up_bias)
    lin = base.blocks[0].attn.qkv
    torch.testing.assert_close(model.blocks[0].attn.qkv(x), lin(x_adapted), rtol=1e-5, atol=1e-5)


def test_groups_do_not_mix():
    _, model = perturbed()
    ad = layers_of(model, "default")[1]
    z = torch.zeros(1, 8)
    z[0, :4] = 1.0  # only group 0's hidden channels
    out = ad._up(z) - ad.up_bias
    assert out[0, :32].abs().sum() > 0 and not out[0, 32:].any()


def test_merge_into_the_next_linear(images):
    base, model = perturbed(scale=0.7)
    expected = model(images)
    ad = model.blocks[0].mlp.fc1.adapters["default"]["all"]
    up = dense_up(ad.up, 2)
    G, g = up @ ad.down, up @ ad.down_bias + ad.up_bias
    w0, b0 = base.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.bias
    w_ref = (w0 @ (torch.eye(64) + 0.7 * G)).detach()
    b_ref = (b0 + 0.7 * w0 @ g).detach()
    vpeft.merge(model)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.bias, b_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    vpeft.unmerge(model)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.base_layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.base_layer.bias, b0, rtol=1e-5, atol=1e-6)


def test_bias_free_layer_gets_a_bias_free_adapter():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 6, bias=False))).eval()
    base = copy.deepcopy(model)
    report = vpeft.apply_method(model, "repadapter", targets=("fc",), head=(), dim=4)
    assert report.trainable == 8 * 4 + 8 * 2
    with torch.no_grad():
        layers_of(model, "default")[0].up.normal_()
    x = torch.randn(3, 8)
    expected = model(x)
    vpeft.merge(model)
    assert model.fc.bias is None
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base(x), expected)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="repadapter option groups"):
        vpeft.apply_method(tiny_vit(), "repadapter", dim=8, groups=3)
    with pytest.raises(ValueError, match="repadapter option dim"):
        vpeft.apply_method(tiny_vit(), "repadapter", dim=0)


def test_vit_b16_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "repadapter")
    assert report.trainable == 2 * 12 * (768 * 8 + 8 + 768 * 4 + 768) == 239_808
    assert {r[0].split(".", 2)[-1] for r in report.rows} == {"attn.qkv", "mlp.fc1"}
