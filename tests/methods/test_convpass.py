"""Convpass: convolutional bypasses beside attention and the MLP, with a 3x3 conv on the token grid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft

from ..conftest import tiny_vit
from ._vit_reference import perturb, quick_gelu, reference_forward


def _bypass(a, u, prefix=1):
    """The official recipe: prefix tokens as 1x1 images and patches as an h x w image, both through the same conv."""
    b, n, _ = u.shape
    side = int(round((n - prefix) ** 0.5))
    z = quick_gelu(F.linear(u, a.down.weight, a.down.bias))  # (B, n, c)
    c = z.shape[-1]
    cls = z[:, :prefix].reshape(b * prefix, c, 1, 1)
    cls = F.conv2d(cls, a.conv.weight, a.conv.bias, padding=1).reshape(b, prefix, c)
    img = z[:, prefix:].reshape(b, side, side, c).permute(0, 3, 1, 2)  # (B, c, h, w), row-major patches
    img = F.conv2d(img, a.conv.weight, a.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(b, side * side, c)
    return F.linear(quick_gelu(torch.cat([cls, img], dim=1)), a.up.weight, a.up.bias)


@pytest.mark.parametrize("conv_init", ["xavier", "identity"])
def test_output_matches_manual_conv_on_the_grid(images, conv_init):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "convpass", scale=0.5, conv_init=conv_init)
    perturb(model)

    def block(i, blk, x):
        wrapped = model.blocks[i]
        at, ml = wrapped.attn.adapters["default"]["all"], wrapped.mlp.adapters["default"]["all"]
        u = blk.norm1(x)
        x = x + blk.attn(u) + 0.5 * _bypass(at, u)
        u = blk.norm2(x)
        return x + blk.mlp(u) + 0.5 * _bypass(ml, u)

    with torch.no_grad():
        torch.testing.assert_close(model(images), reference_forward(base, images, block), rtol=1e-5, atol=1e-5)


def test_the_conv_sees_neighbours_and_the_class_token_only_the_centre_tap():
    model = tiny_vit()
    vpeft.apply_method(model, "convpass", dropout=0.0)
    perturb(model)
    a = model.blocks[0].mlp.adapters["default"]["all"]
    u = torch.randn(1, 17, 64)
    with torch.no_grad():
        ref = a.bypass(u)
        v = u.clone()
        v[:, 1 + 0] += 1.0  # patch (0, 0): its neighbours (0, 1), (1, 0), (1, 1) change; (3, 3) does not
        diff = (a.bypass(v) - ref).abs().sum(-1)[0]
    grid = diff[1:].reshape(4, 4)
    assert grid[0, 0] > 0 and grid[0, 1] > 0 and grid[1, 1] > 0 and grid[3, 3] == 0 and grid[2, 2] == 0
    assert diff[0] == 0  # the class token is its own 1x1 image


def test_init():
    model = tiny_vit()
    vpeft.apply_method(model, "convpass", conv_init="identity")
    a = model.blocks[0].attn.adapters["default"]["all"]
    centre = torch.zeros(8, 8, 3, 3)
    centre[:, :, 1, 1] = torch.eye(8)
    torch.testing.assert_close(a.conv.weight.detach(), centre, rtol=0, atol=0)
    for t in (a.up.weight, a.up.bias, a.down.bias, a.conv.bias):
        assert torch.count_nonzero(t) == 0
    model = tiny_vit()
    vpeft.apply_method(model, "convpass")
    w = model.blocks[0].attn.adapters["default"]["all"].conv.weight
    assert w.abs().max() <= (6 / (72 + 72)) ** 0.5 and w[:, :, 0, 0].abs().sum() > 0  # xavier on (8, 8, 3, 3)


def test_prefix_tokens(images):
    model = tiny_vit(reg_tokens=4)  # 1 class + 4 register tokens + 16 patches
    adapted = copy.deepcopy(model)
    vpeft.apply_method(adapted, "convpass", num_prefix_tokens=model.num_prefix_tokens)
    perturb(adapted)
    a = adapted.blocks[0].attn.adapters["default"]["all"]
    u = torch.randn(2, 21, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.bypass(u), _bypass(a, u, prefix=5), rtol=1e-5, atol=1e-5)
    assert adapted(images).shape == (2, 10)
    wrong = copy.deepcopy(model)
    vpeft.apply_method(wrong, "convpass")  # 21 - 1 = 20 tokens: not a square grid
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        wrong(images)


@pytest.mark.parametrize(
    "options",
    [{"dim": 0}, {"conv_init": "zeros"}, {"dropout": 1.0}, {"num_prefix_tokens": -1}, {"scale": float("inf")}],
)
def test_bad_options(options):
    with pytest.raises(ValueError, match="convpass option"):
        vpeft.apply_method(tiny_vit(), "convpass", **options)


def test_count_vit_b16(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "convpass")
    one = (768 * 8 + 8) + (8 * 8 * 9 + 8) + (8 * 768 + 768)
    assert one == 13_648 and report.trainable == 24 * one == 327_552
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "convpass", targets=("attn",))
    assert report.trainable == 163_776
