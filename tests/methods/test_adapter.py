"""Adapter (Houlsby / NOAH "Adapter" row): a sequential bottleneck on the MLP output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft

from ..conftest import tiny_vit
from ._vit_reference import perturb, quick_gelu, reference_forward


def _layer(model, i):
    return model.blocks[i].mlp.adapters["default"]["all"]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "relu"])
def test_output_is_bottleneck_on_mlp_output(images, act):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "adapter", act=act)
    perturb(model)
    fn = {"quick_gelu": quick_gelu, "gelu": F.gelu, "relu": F.relu}[act]

    def block(i, blk, x):
        a = _layer(model, i)
        x = x + blk.attn(blk.norm1(x))
        h = blk.mlp(blk.norm2(x))  # the base MLP output
        h = h + F.linear(fn(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        return x + h

    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_forward(base, images, block), rtol=1e-5, atol=1e-5)


def test_init_is_identity_with_xavier_down():
    model = tiny_vit()
    vpeft.apply_method(model, "adapter")
    a = _layer(model, 0)
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    assert torch.count_nonzero(a.down.bias) == 0
    bound = (6 / (64 + 8)) ** 0.5  # xavier-uniform on a (8, 64) weight
    assert a.down.weight.abs().max() <= bound and a.down.weight.std() > 0.3 * bound


def test_dropout_only_in_training(images):
    model = tiny_vit()
    vpeft.apply_method(model, "adapter", dropout=0.5)
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        first = model(images)
        assert not torch.allclose(first, model(images))
    assert isinstance(_layer(tiny_vit_with("adapter", dropout=0.0), 0).dropout, torch.nn.Identity)


def tiny_vit_with(method, **options):
    model = tiny_vit()
    vpeft.apply_method(model, method, **options)
    return model


@pytest.mark.parametrize("options", [{"dim": 0}, {"act": "swish"}, {"dropout": 1.0}])
def test_bad_options(options):
    with pytest.raises(ValueError, match="adapter option"):
        vpeft.apply_method(tiny_vit(), "adapter", **options)


def test_count_vit_b16(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "adapter")
    assert report.trainable == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "adapter", dim=16, targets=("attn", "mlp"))
    assert report.trainable == 24 * (768 * 16 + 16 + 16 * 768 + 768)
