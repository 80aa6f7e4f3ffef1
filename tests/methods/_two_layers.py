"""A two-Linear model for method math tests: small enough to compute an adapter's output by hand. Not an
nn.Sequential, so shared modules a method adds (VeRA's projections) become a child of the model."""

from __future__ import annotations

import torch
from torch import nn


class TwoLayers(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 5, d_out: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))
