"""HUT: Hadamard updated transformation (Zhang, Zhou and Chen, "HUT: A More Computation Efficient Fine-Tuning Method
With Hadamard Updated Transformation", arXiv:2409.13501, 2024).

    W' = W0 ⊙ (1 + (alpha / r) B A),   i.e.   h = W0 x + (alpha / r) (W0 ⊙ B A) x,
    A in R^{r x d_in} (Kaiming-uniform), B in R^{d_out x r} (zeros)

The paper's "updated transformation" paradigm builds the new weight as a function of the old one, ``W' = f(W0)``,
instead of adding an unrelated increment: the update is the pre-trained weight itself rescaled element by element by
a low-rank matrix, so it stays correlated with W0 (an entry where W0 is zero never changes). B starts at zero, so
the adapted model equals the base model at initialisation; ``W0 ⊙ (1 + s B A)`` merges exactly and unmerges by the
element-wise division (to float rounding, as IA3). Parameters are LoRA's: ``r (d_in + d_out)`` per target, 294,912
on ViT-B/16 q and v at r = 8.

Sources and choices (checked in session 7 against what could be reached). Verified against the paper's abstract
(arXiv:2409.13501v1, read through the search tool's stored copies of the arXiv page and of two paper digests,
sciencestack.ai and deeppaper.ai): the "direct Updated Transformation" paradigm, a transformation from the original
to the updated parameters rather than an added increment, so the two stay correlated; HUT "updates the original
weight matrix using the Hadamard transformation with two low-rank matrices"; no inference latency (it merges);
experiments on RoBERTa-large (GLUE) and GPT-2 (E2E NLG); and the claim of fewer training FLOPs than LoRA. The form
here is consistent with all of it. Not verified, because the stored copies hold only the opening of each page (the
method section, its equations and the hyper-parameter tables were not reachable) and no official code exists in
the code index: where the Hadamard factor sits (``W0 ⊙ (1 + s B A)`` here, HF PEFT's HiRA form, against
e.g. ``W0 ⊙ (B A)``), the initialisation (LoRA's), the ``alpha / r`` scale and the defaults (r = 8 on q and v,
alpha = 8, dropout 0.1 on the branch input, as vpeft's LoRA), all vpeft's. The project's notes
(``methods-lm.md`` 1.8) record the same gap. Cost: each forward forms ``W0 ⊙ B A`` (out x in, r multiply-adds per
entry) and applies it as a second matmul of the layer's size, about twice the base layer's work; the paper's claim
of fewer training FLOPs than LoRA is not reproduced by this form, which is a hint that the paper's computation
differs (its saving may come from how it evaluates the product); without the method section this stays open.
Wraps Linear (and HF Conv1D) and fused-projection slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, Rank, Target
from ._blocks import dropout


@dataclass
class HUTConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: Rank = 8
    alpha: FiniteFloat = 8.0  # the Hadamard factor is 1 + (alpha / r) B A
    dropout: DropProbability = 0.1  # on the input of the branch


class HUT(AdapterModule):
    Config = HUTConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: HUTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        # the target, unregistered (its weight belongs to the model); W0 is read in every forward
        self.__dict__["target"] = target
        self.scale = config.alpha / config.r
        self.dropout = dropout(config.dropout)
        self.hut_A = nn.Parameter(torch.empty(config.r, target.in_features))  # (r, in)
        self.hut_B = nn.Parameter(torch.zeros(target.out_features, config.r))  # (out, r)
        nn.init.kaiming_uniform_(self.hut_A, a=math.sqrt(5))

    def factor(self, dtype: torch.dtype) -> Tensor:
        """``s B A`` (out, in): the element-wise change of the weight, W' = W0 ⊙ (1 + s B A)."""
        return (self.scale * (self.hut_B @ self.hut_A)).to(dtype)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        w0 = self.target.weight_and_bias()[0]  # (out, in)
        return y + F.linear(self.dropout(x), w0 * self.factor(w0.dtype))

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight * (1 + self.factor(weight.dtype)), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight / (1 + self.factor(weight.dtype)), bias
