"""LN-tune: tune only the LayerNorm affine parameters (the "LayerNorm tuning" baseline of VTAB-1k tables, e.g.
PETL_Vision's ``ln`` flag, 0.038M; see also Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning", ICLR 2024, arXiv:2312.11420).

    y = (g + dg) * xhat + (b + db) = LN(x) + dg * xhat + db,    xhat = (x - mean) / sqrt(var + eps)

Training ``dg``/``db`` (zero at init) with the pretrained ``g``/``b`` frozen is the baseline's update written as a
delta, so the base model survives (disable, unmerge) and the adapted model equals the base one at initialisation.
``xhat`` is recomputed with ``F.layer_norm(x, shape, None, None, eps)`` rather than read back as ``(y - b) / g``,
which would be unstable where ``g`` is near zero. Mergeable and exact: ``g' = g + dg``, ``b' = b + db``.
Targets are every LayerNorm outside the head: on ViT-B/16 ``norm1`` and ``norm2`` of 12 blocks plus the final
``norm``, 25 * 2 * 768 = 38,400 parameters. A LayerNorm without a bias gets only ``dg``; one without an affine
weight is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, Target


@dataclass
class LNTuneConfig(MethodConfig):
    target_types: tuple[str, ...] = ("LayerNorm",)


class LNTune(AdapterModule):
    Config = LNTuneConfig
    wraps = ("norm",)
    mergeable = True

    def __init__(self, target: Target, config: LNTuneConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        ln = target.module
        self.shape, self.eps = tuple(ln.normalized_shape), ln.eps
        self.weight_delta = nn.Parameter(torch.zeros(self.shape))  # dg, shaped like the LN weight
        self.bias_delta = nn.Parameter(torch.zeros(self.shape)) if ln.bias is not None else None  # db

    @classmethod
    def accepts(cls, target: Target, config: LNTuneConfig) -> bool:
        return isinstance(target.module, nn.LayerNorm) and target.module.weight is not None

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        xhat = F.layer_norm(x, self.shape, None, None, self.eps)
        y = y + self.weight_delta * xhat
        return y + self.bias_delta if self.bias_delta is not None else y

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_b = bias + self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias
        return weight + self.weight_delta.to(weight.dtype), new_b

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_b = bias - self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias
        return weight - self.weight_delta.to(weight.dtype), new_b
