"""A shape-only stand-in for ``vpeft.methods._svd.svd``: parameter-count tests need shapes, not a real SVD."""

from __future__ import annotations

import torch


def fake_svd(weight: torch.Tensor):
    out, inp = weight.shape
    k = min(out, inp)
    return torch.zeros(1, 1).expand(out, k), torch.ones(1).expand(k), torch.zeros(1, 1).expand(inp, k)
