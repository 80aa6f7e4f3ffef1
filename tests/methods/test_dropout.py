"""The methods' dropout (``vpeft.methods._blocks.Dropout``): inverted dropout like ``nn.Dropout``, with a 1-byte mask
kept for the backward pass on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vpeft.methods._blocks import Dropout, dropout


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``module(x)``, the input itself excluded."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != x.data_ptr():
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(sizes)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5  # no zeros in the input, so a zero in the output is a dropped element
    out = Dropout(p).train()(x)
    kept = out != 0
    # 200,000 Bernoulli draws: the dropped fraction's standard error is at most 0.0012, so 5 of them
    assert abs((1 - kept.float().mean().item()) - p) < 0.006
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))


def test_gradient_is_the_mask_over_keep_probability():
    torch.manual_seed(1)
    x = (torch.rand(64, 32) + 0.5).requires_grad_(True)
    out = Dropout(0.3).train()(x)
    out.backward(torch.full_like(out, 2.0))
    expected = 2.0 * (out != 0).float() / 0.7
    torch.testing.assert_close(x.grad, expected)


def test_keeps_a_one_byte_mask_where_nn_dropout_keeps_four():
    x = torch.randn(128, 96, requires_grad=True)
    ours, torchs = saved_bytes(Dropout(0.1).train(), x), saved_bytes(nn.Dropout(0.1).train(), x)
    assert ours == x.numel()  # one bool per element
    assert torchs >= 4 * x.numel()  # the float noise tensor


def test_matches_nn_dropout_in_expectation_and_in_eval():
    torch.manual_seed(2)
    x = torch.rand(32, 16) + 0.5
    mean = torch.stack([Dropout(0.25).train()(x) for _ in range(4000)]).mean(0)
    # E[dropout(x)] = x; the standard error of a 4000-draw mean is at most 1.5 * sqrt(1/3 / 4000) = 0.014, so 5 of them
    torch.testing.assert_close(mean, x, atol=0.07, rtol=0)
    assert torch.equal(Dropout(0.25).eval()(x), nn.Dropout(0.25).eval()(x))
    assert isinstance(dropout(0.0), nn.Identity) and isinstance(dropout(0.1), nn.Dropout)
