"""Comp-LoRA: complementary subspace low-rank adaptation (Wang, Dai, Li, Li, Guo and Xiang, "Complementary Subspace
Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification", arXiv:2501.15040; no public code).

The LoRA update is kept out of the top-k singular directions of the pretrained weight ("low rank adaptation
interferes with the most informative direction of the pretrained weight matrix ... we optimize the low rank matrix
in the complementary subspace"). With the float32 SVD ``W = U S V^T`` of the loaded weight (taken when the adapter is
built), ``U_k = U[:, :k]``, ``V_k = V[:, :k]`` and the complementary projectors ``P_out = I - U_k U_k^T``,
``P_in = I - V_k V_k^T``:

    h = W x + (alpha / r) P_out B A P_in dropout(x),    delta W = (alpha / r) P_out B A P_in

A (r x in, Kaiming-uniform) and B (out x r, zeros) are LoRA's, so the count is LoRA's ("no additional parameters")
and the model is the base model at init. The projectors are applied in every forward (as two rank-k corrections,
never as d x d matrices), so ``U_k^T delta W = 0`` and ``delta W V_k = 0`` hold after any number of steps, to float
rounding. ``project="input"`` / ``"output"`` keep only one projector (ablations of the Fig. 1 caption, where both
the input and the output are projected). Mergeable: ``delta W`` folds into W exactly.

Reconstruction and defaults (the paper body is not available to us; this follows its abstract and Fig. 1 caption):
the LoRA setting is the baseline it builds on, CLIP-LoRA (Zanella and Ben Ayed, CVPRW 2024): q, k and v of every
block, r = 2, alpha = 1, dropout 0.25 on the LoRA input. The principal subspace is the top ``k = round(k_ratio *
min(out, in))`` directions with ``k_ratio = 0.1`` (77 of 768), the same split of dominant and remaining singular
values that SALT's released configuration uses; ``k`` sets it absolutely. q, k and v are separate slices of the
fused projection, each with its own SVD (the paper's CLIP keeps them in one ``in_proj_weight``; each d x d block
has its own subspace); on ``nn.MultiheadAttention`` (open_clip's CLIP towers) the update enters through the merged
in-projection, as LoRA's does there, so the input dropout does not apply. U_k and V_k are persistent buffers (saved
with the adapter: an SVD on another device may return another basis). ViT-B/16 count: 12 * 3 * 2 * (768 + 768) =
110,592.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, PositiveInt, ProperFraction, Rank, Target
from . import _svd
from ._blocks import dropout

PROJECT = ("both", "input", "output")


@dataclass
class CompLoRAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v")
    r: Rank = 2
    alpha: FiniteFloat = 1.0  # the update is scaled by alpha / r
    dropout: DropProbability = 0.25
    k_ratio: ProperFraction = 0.1  # principal directions kept out of the update, as a fraction of min(out, in)
    k: PositiveInt | None = None  # the same as an absolute count (overrides k_ratio)
    project: Literal[PROJECT] = "both"  # both | input | output


class CompLoRA(AdapterModule):
    Config = CompLoRAConfig
    wraps = ("linear", "mha")  # nn.MultiheadAttention (open_clip's CLIP): through its merged weights, no dropout
    mergeable = True

    def __init__(self, target: Target, config: CompLoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        r = config.r
        weight, _ = target.weight_and_bias()  # (out, in)
        rank = min(weight.shape)
        k = config.k if config.k is not None else max(1, round(config.k_ratio * rank))
        if k >= rank:
            raise ValueError(
                f"comp_lora option k={k} leaves no complementary subspace in {target.key!r} (rank {rank})."
            )
        self.scale = config.alpha / r
        self.project = config.project
        self.dropout = dropout(config.dropout)
        U, _, V = _svd.svd(weight)
        self.register_buffer("U_k", U[:, :k].contiguous(), persistent=True)  # (out, k)
        self.register_buffer("V_k", V[:, :k].contiguous(), persistent=True)  # (in, k)
        self.lora_A = nn.Parameter(torch.empty(r, weight.shape[1]))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        """The projected factors ``A P_in`` (r x in) and ``P_out B`` (out x r): delta W = s (P_out B)(A P_in)."""
        A, B = self.lora_A, self.lora_B
        if self.project in ("both", "input"):
            A = A - (A @ self.V_k) @ self.V_k.T
        if self.project in ("both", "output"):
            B = B - self.U_k @ (self.U_k.T @ B)
        return A, B

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        A, B = self.factors()
        return y + self.scale * F.linear(F.linear(self.dropout(x), A), B)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return self.scale * (B @ A)
