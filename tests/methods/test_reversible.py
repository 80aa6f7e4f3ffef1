"""MEFT's reversible coupling (vpeft/methods/_reversible.py): gradients equal autograd's in float64, and the tensors
kept for the backward pass do not grow with the depth, while autograd's do."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpeft.methods._reversible import plain, reversible


class LoRAMLP(nn.Module):
    """A frozen two-layer MLP with a trainable rank-2 update on its first layer: a sub-layer as MEFT adapts it."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(2 * width, width, generator=g) / math.sqrt(width), requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(width, 2 * width, generator=g) / math.sqrt(2 * width), requires_grad=False)
        self.a = nn.Parameter(torch.randn(2, width, generator=g) * 0.1)
        self.b = nn.Parameter(torch.randn(2 * width, 2, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ (self.w1 + self.b @ self.a).T) @ self.w2.T


def stack(depth: int, width: int = 8) -> list[tuple[nn.Module, nn.Module]]:
    return [(LoRAMLP(width, 2 * i).double(), LoRAMLP(width, 2 * i + 1).double()) for i in range(depth)]


@pytest.mark.parametrize("lam, beta", [(0.1, 0.1), (1.0, 0.5)])
def test_reversible_gradients_equal_autograds_in_float64(lam, beta):
    pairs = stack(4)
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 8, dtype=torch.float64)
    params = [p for f, g in pairs for m in (f, g) for p in m.parameters() if p.requires_grad]

    def grads(run):
        y1, y2 = run(h, h, pairs, lam, beta)  # MEFT: the input duplicated, the output the mean of the two streams
        loss = ((y1 + y2) / 2 - target).square().sum()
        return loss.detach(), torch.autograd.grad(loss, [h, *params])

    loss_rev, rev = grads(reversible)
    loss_ref, ref = grads(plain)
    assert loss_rev == pytest.approx(float(loss_ref), rel=1e-12)
    for a, b in zip(rev, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)


def saved_bytes(run, depth: int) -> int:
    pairs = stack(depth, width=16)
    h = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y1, y2 = run(h, h, pairs, 0.1, 0.1)
        ((y1 + y2) / 2).square().sum()
    return total


def test_activation_memory_does_not_grow_with_depth():
    rev = [saved_bytes(reversible, d) for d in (2, 8)]
    ref = [saved_bytes(plain, d) for d in (2, 8)]
    assert rev[0] == rev[1]  # the final outputs (and the loss's own inputs) only
    assert ref[1] > 3 * ref[0] > 0 and ref[1] > 10 * rev[1]


def test_zero_lambda_is_refused():
    with pytest.raises(ValueError, match="non-zero"):
        reversible(torch.zeros(1), torch.zeros(1), [], 0.0, 0.1)
