"""LN-tune: every LayerNorm outside the head, forward = LayerNorm with (g + dg, b + db), exact merge, ViT-B/16 count."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of

from ..conftest import tiny_vit


def perturbed():
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ln_tune")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in layers_of(model, "default"):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return base, model


def test_forward_is_layer_norm_with_shifted_affine():
    base, model = perturbed()
    x = torch.randn(2, 5, 64)
    layer = layers_of(model, "default")[1]  # blocks.0.norm2
    ln = base.blocks[0].norm2
    ref = F.layer_norm(x, (64,), ln.weight + layer.weight_delta, ln.bias + layer.bias_delta, ln.eps)
    torch.testing.assert_close(model.blocks[0].norm2(x), ref, rtol=1e-5, atol=1e-5)


def test_merge_adds_the_deltas(images):
    base, model = perturbed()
    expected = model(images)
    deltas = {k: v.detach().clone() for k, v in layers_of(model, "default")[-1].state_dict().items()}  # final norm
    vpeft.merge(model)
    torch.testing.assert_close(model.norm.weight, base.norm.weight + deltas["weight_delta"])
    torch.testing.assert_close(model.norm.bias, base.norm.bias + deltas["bias_delta"])
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_vit_b16_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "ln_tune")
    assert report.trainable == 25 * 2 * 768 == 38_400
    assert len(report.rows) == 25 and all(r[1] == "LayerNorm" for r in report.rows)
