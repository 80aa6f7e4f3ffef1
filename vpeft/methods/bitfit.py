"""BitFit: tune only the bias terms (Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", ACL 2022, arXiv:2106.10199).

    y = W x + (b + delta_b),    delta_b = 0 at initialisation

Training ``delta_b`` with ``b`` frozen is the paper's update written as a delta, so the base model survives
(disable, unmerge) and ``b + delta_b`` merges exactly. Targets are every Linear, Conv2d and LayerNorm with a bias
outside the head, as on the VTAB-1k leaderboard: 102,912 parameters on ViT-B/16 (qkv, proj, fc1, fc2, norm1, norm2
in 12 blocks, plus the patch embedding and the final norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, Target


@dataclass
class BitFitConfig(MethodConfig):
    target_types: tuple[str, ...] = ("Linear", "Conv1D", "Conv2d", "LayerNorm")


class BitFit(AdapterModule):
    Config = BitFitConfig
    wraps = ("linear", "conv2d", "norm")
    mergeable = True

    def __init__(self, target: Target, config: BitFitConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.bias_delta = nn.Parameter(torch.zeros(target.out_features))  # (out,)
        self.channel_dim = 1 if target.kind == "conv2d" else -1

    @classmethod
    def accepts(cls, target: Target, config: BitFitConfig) -> bool:
        """layers with a bias term (BitFit tunes bias terms, so a layer without one has nothing to tune)."""
        return getattr(target.module, "bias", None) is not None

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        shape = (-1, 1, 1) if self.channel_dim == 1 else (-1,)
        return y + self.bias_delta.view(shape)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight, bias + self.bias_delta.to(bias.dtype)

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight, bias - self.bias_delta.to(bias.dtype)
