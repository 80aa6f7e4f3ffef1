"""(IA)^3 against direct computations: output vectors on projections and fused slices, input vectors on the second
FFN linear, the merge as ``diag(l) W`` / ``W diag(l)``, the option checks, and the ViT-B/16 count."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.errors import ConfigError, OptionError


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def test_vit_b16_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "ia3")  # roles k, v (slices of qkv) and mlp.fc2's input
    assert report.trainable == 12 * (768 + 768 + 3072) == 55_296


def test_output_vectors_scale_only_their_slices_of_a_fused_projection():
    layer = nn.Linear(6, 18)  # a fused [q; k; v] projection, 6 wide each
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "ia3", targets=["0[k,v]"], feedforward=[], head=[])
    randomised(model)
    parts = model[0].adapters["default"]
    scale = torch.cat([torch.ones(6), parts["k"].ia3_l, parts["v"].ia3_l])  # q columns untouched
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias) * scale, rtol=1e-6, atol=1e-6)


def test_feedforward_vector_scales_the_input_and_merges_into_columns():
    """l_ff rescales the FFN's intermediate activation, the input of W_2: ``W_2 (l * a) + b = (W_2 diag(l)) a + b``."""
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    model = copy.deepcopy(mlp)
    vpeft.apply_method(model, "ia3", targets=["2"], feedforward=["2"], head=[])
    randomised(model)
    l_ff = model[2].adapters["default"]["all"].ia3_l
    assert l_ff.shape == (8,)
    x = torch.randn(3, 4)
    expected = F.linear(mlp[1](mlp[0](x)) * l_ff, mlp[2].weight, mlp[2].bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    vpeft.merge(model)
    torch.testing.assert_close(model[2].weight, mlp[2].weight * l_ff, rtol=0, atol=0)
    torch.testing.assert_close(model[2].bias, mlp[2].bias, rtol=0, atol=0)


def test_output_vector_merges_into_rows_and_the_bias():
    layer = nn.Linear(5, 3)
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "ia3", targets=["0"], feedforward=[], head=[])
    randomised(model)
    l_out = model[0].adapters["default"]["all"].ia3_l.detach().clone()
    vpeft.merge(model)
    torch.testing.assert_close(model[0].weight, l_out[:, None] * layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(model[0].bias, l_out * layer.bias, rtol=0, atol=0)


def test_vectors_start_at_one_and_are_the_only_trainable_tensors(vit):
    vpeft.apply_method(vit, "ia3", head=())
    trainable = {n: p for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("ia3_l") and torch.equal(p, torch.ones_like(p)) for n, p in trainable.items())


def test_bad_feedforward_options_are_refused():
    with pytest.raises(ConfigError, match=r"slice of a fused projection"):
        vpeft.apply_method(nn.Sequential(nn.Linear(6, 18)), "ia3", targets=["0[k,v]"], feedforward=["0"], head=[])
    with pytest.raises(OptionError, match=r"feedforward entry 'fc9' matches none of the targets") as err:
        vpeft.apply_method(nn.Sequential(nn.Linear(6, 6)), "ia3", targets=["0"], feedforward=["fc9"], head=[])
    assert err.value.option == "feedforward"
