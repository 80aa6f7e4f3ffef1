"""DoRA: weight-decomposed low-rank adaptation (Liu, Wang, Yin, Molchanov, Wang, Cheng and Chen, "DoRA:
Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353).

    W' = m * (W0 + s B A) / ||W0 + s B A||,    m in R^{d_out} initialised to ||W0||,  s = alpha / r

with the norm taken per output row over the input dimension (the paper's "column" norm of its (in x out) view; HF
PEFT's ``get_weight_norm`` does the same on the (out, in) weight). A and B are LoRA's (A Kaiming-uniform, B zeros),
so W' = W0 at initialisation. As in the paper's section 4.3 the norm is treated as a constant (detached) in the
forward pass, and the base output is not recomputed:

    y' = b + (m / ||W0 + s B A||) * (y - b + s B A dropout(x)),    y = W0 x + b  (the bias is not rescaled)

Dropout on the LoRA input only (``W0 x`` is the undropped base output), as HF PEFT. There is no official VTAB-1k
setting (the paper evaluates commonsense reasoning and vision-language tasks), so the defaults are vpeft's LoRA ones:
r = 8, alpha = 8, dropout 0.1 on q and v. ViT-B/16 count: 12 * 2 * (8 * 768 + 768 * 8 + 768) = 313,344
(322,560 with ``targets=("qkv",)`` on the fused projection).

Mergeable and exact: ``merged`` returns ``m * (W + s B A) / ||W + s B A||`` and keeps that norm (a non-persistent
buffer) so that ``unmerged`` inverts it, ``W = W' * norm / m - s B A``. DoRA is not additive, so ``delta_weight``
is not defined. Wraps Linear (and HF Conv1D) and fused-projection slices; Conv2d and nn.MultiheadAttention are not
supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Target
from .lora import LoRA, LoRAConfig


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA's options: the rank, its scaling, dropout and the targets."""


class DoRA(LoRA):
    Config = DoRAConfig
    lora_variant = "dora"
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: DoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        # the target, unregistered (its weight belongs to the model); its weight is read in every forward
        self.__dict__["target"] = target
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._base_weight().detach().float().norm(dim=1).to(self.lora_A.dtype))
        self.register_buffer("merge_norm", None, persistent=False)  # (out,), set by merged() for unmerged()

    def _base_weight(self) -> Tensor:
        return self.target.weight_and_bias()[0]  # (out, in)

    def _base_bias(self) -> Tensor | None:
        return self.target.weight_and_bias()[1]

    def _directional(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)  # (out, in)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():  # paper section 4.3: the norm is a constant in backpropagation
            norm = self._directional(self._base_weight()).norm(dim=1)  # (out,)
        lora = self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        bias = self._base_bias()
        wx = y - bias if bias is not None else y  # W0 x, without recomputing it
        out = (self.magnitude / norm) * (wx + lora)
        return out + bias if bias is not None else out

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w = self._directional(weight)
        norm = w.norm(dim=1)  # (out,)
        self.merge_norm = norm.detach().clone()
        return (self.magnitude.to(w.dtype) / norm)[:, None] * w, bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.merge_norm is None:
            raise ValueError("dora: unmerged() needs the norm that merged() used; merge this adapter first.")
        w = weight * (self.merge_norm.to(weight.dtype) / self.magnitude.to(weight.dtype))[:, None]
        return w - self.scale * (self.lora_B @ self.lora_A).to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        raise NotImplementedError("dora is not additive: use merged()/unmerged() to fold it into the weights")
