"""Natural GaLore (vpeft/optim/natural_galore.py): the Woodbury step against the explicit ``k x k`` solve, and one
optimiser step against the formulas computed here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpeft.optim import build_optimizer
from vpeft.optim.natural_galore import woodbury_natural_gradient


@pytest.mark.parametrize("filled", [1, 5, 20])
def test_woodbury_step_equals_the_explicit_solve_in_float64(filled):
    g = torch.Generator().manual_seed(filled)
    k, s, damping = 48, 20, 1e-3
    history = torch.zeros(s, k, dtype=torch.float64)
    history[s - filled :] = torch.randn(filled, k, generator=g, dtype=torch.float64)  # zeros until the window fills
    grad = history[-1].clone()  # the current gradient is the newest column, as in the optimiser
    fisher = damping * torch.eye(k, dtype=torch.float64) + history.t() @ history  # lambda I + G G^T, k x k
    explicit = torch.linalg.solve(fisher, grad)
    ours = woodbury_natural_gradient(grad, history, damping)
    assert torch.allclose(ours, explicit, rtol=0, atol=1e-8 * explicit.abs().max().item())
    assert (ours - explicit).abs().max().item() < 1e-8 * max(1.0, explicit.abs().max().item())
    # an unrelated gradient too (off the history's span in part)
    other = torch.randn(k, generator=g, dtype=torch.float64)
    assert torch.allclose(woodbury_natural_gradient(other, history, damping), torch.linalg.solve(fisher, other),
                          rtol=1e-10, atol=1e-8)  # fmt: skip


def test_one_natural_galore_step_by_hand():
    """Step 1 of a 6 x 10 weight (rank 2, two-sided projection): R = U^T G V, the Woodbury step on R alone (a window
    of one), Adam's first step on it, projected back with the scale."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6, bias=False).double()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 10, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    grad = layer.weight.grad.clone()
    lr, rank, scale, eps, damping = 1e-2, 2, 0.25, 1e-6, 1e-3
    options = dict(rank=rank, targets=("0",), eps=eps, damping=damping, natural_history=3)
    opt = build_optimizer(nn.Sequential(layer), "natural_galore", lr=lr, weight_decay=0.0, **options)
    opt.step()

    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    p, q = u[:, :rank].double(), vh[:rank].double()
    r = (p.t() @ grad @ q.t()).reshape(-1)
    natural = torch.linalg.solve(damping * torch.eye(r.numel(), dtype=torch.float64) + torch.outer(r, r), r)
    b1, b2 = 0.9, 0.999
    m, v = (1 - b1) * natural, (1 - b2) * natural**2
    step = lr * math.sqrt(1 - b2) / (1 - b1)
    expected = w0 - step * scale * (p @ (m / (v.sqrt() + eps)).reshape(rank, rank) @ q)
    assert torch.allclose(layer.weight.detach(), expected, rtol=0, atol=1e-12)
    assert opt.state[layer.weight]["history"].shape == (3, rank * rank)
