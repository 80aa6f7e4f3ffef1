"""SoMA: minor-component init from an independent SVD, exact identity, the frozen residual after steps, early blocks
frozen, the cosine weight-decay schedule, and the ViT-B/16 count."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of
from vpeft.methods import _svd

from ..conftest import tiny_vit
from ._svd_fake import fake_svd


def adapted(**options):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "soma", **options)
    return base, model


def test_minor_components_of_the_loaded_weight():
    base = tiny_vit()
    with torch.no_grad():  # "load" other weights first: the SVD must see these
        base.blocks[1].attn.qkv.weight.mul_(2.0).add_(0.01)
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "soma", r=4, alpha=8.0)
    q = layers_of(model, "default")[0]  # blocks.1.attn.qkv[q]
    w = base.blocks[1].attn.qkv.weight[:64].double()
    U, S, Vh = torch.linalg.svd(w)
    minor = U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]
    torch.testing.assert_close((q.scale * q.B0 @ q.A0).double(), minor, rtol=0, atol=1e-5)
    # A = diag(sqrt(S/s)) V^T: its rows are orthogonal with squared norms S_m / s
    torch.testing.assert_close((q.A0 @ q.A0.T).double(), torch.diag(S[-4:] / q.scale), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.lora_A, q.A0, rtol=0, atol=0)


def test_identity_and_merge_at_init_are_exact(images):
    base, model = adapted()
    assert torch.equal(model(images), base(images))
    vpeft.merge(model)
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_early_blocks_frozen():
    _, model = adapted()  # depth 2: start_block = ceil(2 / 3) = 1
    state = model._vpeft.adapters["default"]
    assert state.config.start_block == 1
    assert all(t.startswith("blocks.1.") for t in state.targets) and len(state.targets) == 6
    _, model = adapted(start_block=0)
    assert len(model._vpeft.adapters["default"].targets) == 12


def test_residual_stays_frozen_after_steps(images):
    base, model = adapted(r=4)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
        opt.step()
    model.eval()
    layers = layers_of(model, "default")
    fc1 = layers[4]  # blocks.1.mlp.fc1
    w0, b0 = base.blocks[1].mlp.fc1.weight, base.blocks[1].mlp.fc1.bias
    assert fc1.bias_delta.abs().sum() > 0 and not torch.equal(fc1.lora_A, fc1.A0)
    w_res = w0 - fc1.scale * fc1.B0 @ fc1.A0  # frozen, from the init
    x = torch.randn(5, 64)
    expected = F.linear(x, w_res + fc1.scale * fc1.lora_B @ fc1.lora_A, b0 + fc1.bias_delta)
    torch.testing.assert_close(model.blocks[1].mlp.fc1(x), expected, rtol=1e-5, atol=1e-5)
    merged = copy.deepcopy(model)
    vpeft.merge(merged)
    torch.testing.assert_close(
        merged.blocks[1].mlp.fc1.weight - fc1.scale * fc1.lora_B @ fc1.lora_A, w_res, rtol=0, atol=1e-5
    )


def test_cosine_weight_decay():
    _, model = adapted()
    mine = [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and not p.shape[0] == 10]
    head = [model.head.adapters["default"]["all"].weight]
    other = torch.nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.AdamW(
        [
            {"params": mine + head, "weight_decay": 1e-4},
            {"params": [p for p in model.parameters() if p.requires_grad and p.ndim == 1], "weight_decay": 0.0},
            {"params": [other], "weight_decay": 0.3},
        ]
    )
    total = 11
    for step, want in ((0, 0.05), (5, 1e-5 + (0.05 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5))), (10, 1e-5)):
        vpeft.on_step(model, step, total, opt)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(want, rel=1e-9)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        assert opt.param_groups[2]["weight_decay"] == 0.3
    _, model = adapted(weight_decay=None)  # start from the group's own value
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.02)
    vpeft.on_step(model, 0, 3, opt)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.02)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="soma option r"):
        vpeft.apply_method(tiny_vit(), "soma", r=0)
    with pytest.raises(ValueError, match="soma option start_block"):
        vpeft.apply_method(tiny_vit(), "soma", start_block=-1)


def test_vit_b16_count(vit_b16, monkeypatch):
    monkeypatch.setattr(_svd, "svd", fake_svd)
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "soma")
    ab = 8 * (4 * 16 * (768 + 768) + 2 * 16 * (768 + 3072))  # blocks 4..11 of 12
    biases = 8 * (4 * 768 + 3072 + 768)
    assert report.trainable == ab + biases == 1_824_768


def test_tuned_biases_get_no_weight_decay_from_the_engines_optimiser():
    """The documented departure: the engine's AdamW puts every delta_b in the zero-decay group (and the annealing
    leaves it there), A and B in the decayed group that follows the cosine."""
    from vpeft.engine.optim import build_optimizer

    _, model = adapted()
    layers = layers_of(model, "default")
    biases = {id(layer.bias_delta) for layer in layers}
    factors = {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    assert len(biases) == len(layers) > 0
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.999))
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    (decayed,) = {group_of[i] for i in factors}
    (undecayed,) = {group_of[i] for i in biases}
    assert opt.param_groups[undecayed]["weight_decay"] == 0.0 and decayed != undecayed
    for step in range(0, 11, 5):
        vpeft.on_step(model, step, 11, opt)
        assert opt.param_groups[undecayed]["weight_decay"] == 0.0
    assert opt.param_groups[decayed]["weight_decay"] == pytest.approx(1e-5)
