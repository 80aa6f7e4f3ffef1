"""BitFit, linear probing and full fine-tuning: which tensors train, counted on ViT-B/16."""

from __future__ import annotations

import copy

import torch
from torch import nn

import vpeft


def test_bitfit_count_is_every_bias_outside_the_head(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "bitfit")
    biases = sum(p.numel() for n, p in vit_b16.named_parameters() if n.endswith("bias") and not n.startswith("head"))
    assert report.trainable == biases == 102_912


def test_linear_probe_trains_the_head_only(vit_b16):
    model = copy.deepcopy(vit_b16)
    report = vpeft.apply_method(model, "linear")
    assert report.trainable == 0 and report.head == 76_900
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 76_900


def test_full_trains_everything_in_place(vit_b16):
    model = copy.deepcopy(vit_b16)
    report = vpeft.apply_method(model, "full")
    assert report.trainable == sum(p.numel() for p in vit_b16.parameters()) and report.head == 0
    assert set(model.state_dict()) == set(vit_b16.state_dict())  # nothing wrapped


def test_bitfit_merge_adds_the_delta_to_the_bias():
    layer = nn.Linear(4, 3)
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "bitfit", head=[])
    with torch.no_grad():
        model[0].adapters["default"]["all"].bias_delta.copy_(torch.tensor([1.0, -2.0, 0.5]))
    vpeft.merge(model)
    torch.testing.assert_close(model[0].bias, layer.bias + torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(model[0].weight, layer.weight)
