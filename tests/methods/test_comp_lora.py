"""Comp-LoRA: the update stays orthogonal to the top-k singular directions after training steps, the forward against
explicit d x d projectors, the ablations, and the ViT-B/16 count."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of
from vpeft.methods import _svd

from ..conftest import tiny_vit
from ._svd_fake import fake_svd


def trained(images, **options):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "comp_lora", **options)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
        opt.step()
    return base, model.eval()


def top_k(w: torch.Tensor, k: int):
    U, _, Vh = torch.linalg.svd(w.double())  # independent, float64
    return U[:, :k], Vh[:k].T


def test_update_stays_in_complement_after_steps(images):
    base, model = trained(images)
    layers = layers_of(model, "default")
    assert len(layers) == 6  # q, k, v of 2 blocks
    for i, layer in enumerate(layers):
        block, part = divmod(i, 3)
        w = base.blocks[block].attn.qkv.weight[64 * part : 64 * (part + 1)]
        Uk, Vk = top_k(w, 6)  # k = round(0.1 * 64)
        dW = layer.delta_weight().double()
        assert dW.abs().max() > 1e-4  # it did train
        assert (Uk.T @ dW).abs().max() < 1e-6 * dW.abs().max() * 64
        assert (dW @ Vk).abs().max() < 1e-6 * dW.abs().max() * 64


def test_forward_matches_explicit_projectors(images):
    base, model = trained(images, dropout=0.0)
    layer = layers_of(model, "default")[2]  # blocks.0.attn.qkv[v]
    w, b = base.blocks[0].attn.qkv.weight[128:], base.blocks[0].attn.qkv.bias[128:]
    Uk, Vk = top_k(w, 6)
    P_out = torch.eye(64, dtype=torch.float64) - Uk @ Uk.T
    P_in = torch.eye(64, dtype=torch.float64) - Vk @ Vk.T
    delta = layer.scale * P_out @ layer.lora_B.double() @ layer.lora_A.double() @ P_in
    x = torch.randn(5, 64)
    expected = F.linear(x.double(), w.double() + delta, b.double()).float()
    torch.testing.assert_close(model.blocks[0].attn.qkv(x)[:, 128:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("project", ["input", "output"])
def test_one_sided_ablations(images, project):
    base, model = trained(images, project=project, k=8)
    layer = layers_of(model, "default")[0]
    Uk, Vk = top_k(base.blocks[0].attn.qkv.weight[:64], 8)
    dW = layer.delta_weight().double()
    kept, free = ((dW @ Vk), (Uk.T @ dW)) if project == "input" else ((Uk.T @ dW), (dW @ Vk))
    assert kept.abs().max() < 1e-5 * dW.abs().max()
    assert free.abs().max() > 1e-3 * dW.abs().max()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="comp_lora option project"):
        vpeft.apply_method(tiny_vit(), "comp_lora", project="middle")
    with pytest.raises(ValueError, match="comp_lora option k="):
        vpeft.apply_method(tiny_vit(), "comp_lora", k=64)


def test_vit_b16_count(vit_b16, monkeypatch):
    monkeypatch.setattr(_svd, "svd", fake_svd)
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "comp_lora").trainable == 12 * 3 * 2 * (768 + 768)
