"""SORSA: the principal-SVD init against a float64 SVD, the frozen residual after steps, the orthonormal regulariser's
value by hand, and its gamma / lr gradient added by ``on_step`` (the learning rate the optimizer was built with)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of
from vpeft.methods import _svd
from vpeft.methods.sorsa import SORSA

from ..conftest import perturb, tiny_vit
from ._svd_fake import fake_svd


def adapted(**options):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "sorsa", **{"r": 4, **options})
    return base, model


def test_principal_components_of_the_weight(images):
    base, model = adapted(alpha=8.0)
    fc1 = layers_of(model, "default")[4]  # blocks.0.mlp.fc1: 256 x 64
    w = base.blocks[0].mlp.fc1.weight.double()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(fc1.sorsa_S.double(), S[:4], rtol=1e-6, atol=0)
    principal = (fc1.sorsa_B.double() * fc1.sorsa_S.double()) @ fc1.sorsa_A.double()
    torch.testing.assert_close(principal, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-5)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(fc1.sorsa_A.double() @ fc1.sorsa_A.double().T, eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(fc1.sorsa_B.double().T @ fc1.sorsa_B.double(), eye, rtol=0, atol=1e-6)
    assert fc1.scale == 2.0
    assert torch.equal(model(images), base(images))  # exact at init, whatever the scale


def test_residual_stays_frozen_after_steps(images):
    base, model = adapted()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
        opt.step()
    model.eval()
    fc1 = layers_of(model, "default")[4]
    assert not torch.equal(fc1.sorsa_A, fc1.A0) and not torch.equal(fc1.sorsa_S, fc1.S0)
    w0, b0 = base.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.bias
    w_res = w0 - (fc1.B0 * fc1.S0) @ fc1.A0  # W_r = W - s B0 diag(S0) A0 from the init, s = 1
    x = torch.randn(5, 64)
    expected = F.linear(x, w_res + (fc1.sorsa_B * fc1.sorsa_S) @ fc1.sorsa_A, b0)
    torch.testing.assert_close(model.blocks[0].mlp.fc1(x), expected, rtol=1e-5, atol=1e-5)


def hand_terms(model) -> list[torch.Tensor]:
    """``||A A^T - I||_F`` and ``||B^T B - I||_F`` of every adapted target, in float64, entry by entry."""
    terms = []
    for layer in layers_of(model, "default"):
        a, b = layer.sorsa_A.double(), layer.sorsa_B.double()
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        terms += [((a @ a.T - eye) ** 2).sum().sqrt(), ((b.T @ b - eye) ** 2).sum().sqrt()]
    return terms


def test_orthonormal_regulariser_value_by_hand():
    _, model = adapted()
    perturb(model)
    terms = hand_terms(model)
    assert len(terms) == 2 * 12  # q, k, v, proj, fc1, fc2 in two blocks: one A and one B each
    value = SORSA.orthonormal_penalty(layers_of(model, "default"))
    assert value.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-6)
    assert vpeft.method_loss(model) is None  # applied in on_step, not as a loss term


def test_on_step_adds_gamma_over_the_configured_lr_times_the_regulariser_gradient():
    _, model = adapted(gamma=3e-3)
    perturb(model)
    layers = layers_of(model, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.02)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1)  # sets the lr to 0.002, keeps initial_lr 0.02
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    before = {id(p): p.grad.clone() for p in params}
    vpeft.on_step(model, 0, 10, opt)
    count = 2 * len(layers)
    weight = 3e-3 / 0.02  # gamma / initial lr, not the scheduled lr
    for layer in layers:
        a, b = layer.sorsa_A.detach().double(), layer.sorsa_B.detach().double()
        ma = a @ a.T - torch.eye(4, dtype=torch.float64)  # d ||M||_F / dA = 2 M A / ||M||_F for M = A A^T - I
        mb = b.T @ b - torch.eye(4, dtype=torch.float64)  # d ||M||_F / dB = 2 B M / ||M||_F for M = B^T B - I
        grad_a = 2 * ma @ a / ma.norm() / count
        grad_b = 2 * b @ mb / mb.norm() / count
        added_a = layer.sorsa_A.grad.double() - before[id(layer.sorsa_A)].double()
        added_b = layer.sorsa_B.grad.double() - before[id(layer.sorsa_B)].double()
        torch.testing.assert_close(added_a, weight * grad_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(added_b, weight * grad_b, rtol=1e-4, atol=1e-6)
        assert torch.equal(layer.sorsa_S.grad, before[id(layer.sorsa_S)])  # the singular values: no term


def test_on_step_without_optimizer_or_gamma_adds_nothing():
    for options, with_optimizer in (({}, False), ({"gamma": 0.0}, True)):
        _, model = adapted(**options)
        perturb(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        vpeft.on_step(model, 0, 10, opt if with_optimizer else None)
        assert all(p.grad is None for p in params)


def test_vit_b16_count(vit_b16, monkeypatch):
    monkeypatch.setattr(_svd, "svd", fake_svd)
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "sorsa")  # r = 128 on q, k, v, proj, fc1, fc2
    per_block = 4 * (128 * (768 + 768) + 128) + 2 * (128 * (768 + 3072) + 128)
    assert report.trainable == 12 * per_block == 21_242_880
