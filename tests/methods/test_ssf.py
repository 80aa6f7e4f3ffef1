"""SSF: the official init (not the identity), placement and count on ViT-B/16, per-kind forward math, exact merge."""

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


def test_vit_b16_placement_count_and_init(vit_b16):
    model = copy.deepcopy(vit_b16)
    report = vpeft.apply_method(model, "ssf")
    assert report.trainable == 205_824
    names = {r[0] for r in report.rows}
    per_block = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"}
    assert names == {f"blocks.{i}.{n}" for i in range(12) for n in per_block} | {"patch_embed.proj", "norm"}
    layers = layers_of(model, "default")
    scale = torch.cat([layer.scale.detach() for layer in layers])
    shift = torch.cat([layer.shift.detach() for layer in layers])
    assert abs(scale.mean().item() - 1.0) < 1e-3 and 0.019 < scale.std().item() < 0.021
    assert abs(shift.mean().item()) < 1e-3 and 0.019 < shift.std().item() < 0.021


def test_not_identity_at_init(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ssf")
    assert not torch.allclose(model(images), base(images), atol=1e-4)
    with vpeft.disabled(model):
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


def test_forward_per_kind(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ssf")
    mods = dict(model.named_modules())
    # Linear: channels last
    x = torch.randn(2, 5, 64)
    fc1 = mods["blocks.1.mlp.fc1"].adapters["default"]["all"]
    ref = F.linear(x, base.blocks[1].mlp.fc1.weight, base.blocks[1].mlp.fc1.bias) * fc1.scale + fc1.shift
    torch.testing.assert_close(model.blocks[1].mlp.fc1(x), ref)
    # Conv2d: channel dim 1
    pe = mods["patch_embed.proj"].adapters["default"]["all"]
    ref = base.patch_embed.proj(images) * pe.scale[:, None, None] + pe.shift[:, None, None]
    torch.testing.assert_close(model.patch_embed.proj(images), ref)
    # LayerNorm: channels last
    n1 = mods["blocks.0.norm1"].adapters["default"]["all"]
    ln = base.blocks[0].norm1
    ref = F.layer_norm(x, (64,), ln.weight, ln.bias, ln.eps) * n1.scale + n1.shift
    torch.testing.assert_close(model.blocks[0].norm1(x), ref)


def test_merged_weights_by_hand(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ssf")
    expected = model(images)
    mods = dict(model.named_modules())
    pe = mods["patch_embed.proj"].adapters["default"]["all"].state_dict()
    qkv = mods["blocks.0.attn.qkv"].adapters["default"]["all"].state_dict()
    vpeft.merge(model)
    w, b = base.patch_embed.proj.weight, base.patch_embed.proj.bias
    torch.testing.assert_close(model.patch_embed.proj.weight, pe["scale"].view(-1, 1, 1, 1) * w)
    torch.testing.assert_close(model.patch_embed.proj.bias, pe["scale"] * b + pe["shift"])
    w, b = base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, qkv["scale"][:, None] * w)
    torch.testing.assert_close(model.blocks[0].attn.qkv.bias, qkv["scale"] * b + qkv["shift"])
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_layer_without_bias_is_skipped():
    model = nn.Sequential(OrderedDict(a=nn.Linear(8, 8), b=nn.Linear(8, 8, bias=False)))
    report = vpeft.apply_method(model, "ssf", targets=(r"a|b",), head=())
    assert [r[0] for r in report.rows] == ["a"]


def test_bad_option_is_refused():
    with pytest.raises(ValueError, match="ssf option init_std"):
        vpeft.apply_method(tiny_vit(), "ssf", init_std=-1.0)
