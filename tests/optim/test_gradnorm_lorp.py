"""GradNormLoRP (vpeft/optim/gradnorm_lorp.py): one step checked by hand. The gradients of the magnitude and of the
direction come from autograd through ``W = g V / ||V||`` (not from the optimiser's closed form), the basis from the
SVD of the direction's gradient, and Adam's first step is written out."""

from __future__ import annotations

import math

import torch
from torch import nn

from vpeft.optim import build_optimizer


def test_one_gradnorm_lorp_step_by_hand():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5, bias=True).double()
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 8, dtype=torch.float64)
    target = torch.randn(7, 5, dtype=torch.float64)

    bias0 = layer.bias.detach().clone()

    def loss_of(weight, bias=bias0):
        return (nn.functional.linear(x, weight, bias) - target).pow(2).mean()

    loss_of(layer.weight, layer.bias).backward()
    lr, rank, scale, eps, wd = 1e-2, 2, 0.25, 1e-6, 0.1
    opt = build_optimizer(
        nn.Sequential(layer), "gradnorm_lorp", lr=lr, weight_decay=wd, rank=rank, targets=("0",), eps=eps
    )
    bias_grad = layer.bias.grad.clone()
    opt.step()

    # the reparametrisation, differentiated by autograd at V = W / ||W|| (unit rows), g = ||W||
    g = w0.norm(dim=1, keepdim=True).requires_grad_()
    v = (w0 / w0.norm(dim=1, keepdim=True)).requires_grad_()
    loss_of(g * v / v.norm(dim=1, keepdim=True)).backward()
    grad_g, grad_v = g.grad, v.grad
    # the 5 x 8 gradient is wide: 'std' keeps the left singular vectors, R = P^T grad_V (r x 8)
    u, _, _ = torch.linalg.svd(grad_v.float(), full_matrices=False)
    p = u[:, :rank].double()
    r = p.t() @ grad_v
    b1, b2 = 0.9, 0.999
    step = lr * math.sqrt(1 - b2) / (1 - b1)

    def adam_first(x):
        return ((1 - b1) * x) / (((1 - b2) * x**2).sqrt() + eps)

    v1 = v.detach() - step * scale * (p @ adam_first(r))
    g1 = g.detach() - step * adam_first(grad_g)
    g1 = g1 - lr * wd * g1  # decoupled decay, on the magnitude
    expected = g1 * v1 / v1.norm(dim=1, keepdim=True)
    assert torch.allclose(layer.weight.detach(), expected, rtol=0, atol=1e-12)
    # each row's norm is the new magnitude, the state holds it (5 x 1), not a copy of V
    assert torch.allclose(layer.weight.detach().norm(dim=1, keepdim=True), g1.abs(), atol=1e-12)
    state = opt.state[layer.weight]
    assert state["magnitude"].shape == (5, 1) and state["exp_avg"].shape == (rank, 8) and "v" not in state
    # the bias is not projected: GaLore's plain Adam step with decay after it
    bias1 = bias0 - step * adam_first(bias_grad)
    assert torch.allclose(layer.bias.detach(), bias1, atol=1e-12)  # 1-D: no weight decay


def test_weight_norm_gradients_are_the_closed_form():
    """The optimiser's ``grad_g = rowsum(grad_W * V)``, ``grad_V = g (grad_W - grad_g V)`` at unit rows equal
    autograd's through ``g V / ||V||`` (Salimans & Kingma eq. 3)."""
    torch.manual_seed(1)
    w = torch.randn(4, 6, dtype=torch.float64)
    grad_w = torch.randn(4, 6, dtype=torch.float64)
    g = w.norm(dim=1, keepdim=True).requires_grad_()
    v = (w / w.norm(dim=1, keepdim=True)).requires_grad_()
    (g * v / v.norm(dim=1, keepdim=True) * grad_w).sum().backward()
    unit = v.detach()
    closed_g = (grad_w * unit).sum(dim=1, keepdim=True)
    closed_v = g.detach() * (grad_w - closed_g * unit)
    assert torch.allclose(g.grad, closed_g, atol=1e-12) and torch.allclose(v.grad, closed_v, atol=1e-12)
