"""SVFit: fine-tuning the top singular values only (Sun, Wei, Wu et al., "SVFit: Parameter-Efficient Fine-Tuning of
Large Pre-Trained Models Using Singular Values", arXiv:2409.05926).

Each target weight is split by its float32 SVD ``W = U S V^T`` (taken when the adapter is built, on the loaded
weight) into its best rank-r part and the rest (the paper's ``W = W_r + W_e``):

    W = U_r diag(sigma) V_r^T + W_e,    sigma in R^r trainable, initialised to the top-r singular values S_r;
                                          U_r, V_r and W_e = W - U_r diag(S_r) V_r^T frozen

so only the r singular values train: **r parameters per matrix**. Non-destructive: the base weight is untouched and
the layer adds ``U_r diag(sigma - S_r) V_r^T x``, with ``U_r`` (out, r), ``V_r^T`` (r, in) and ``S_r`` as frozen
persistent buffers (saved: the SVD is device-dependent); at init ``sigma - S_r`` is exactly zero, so the adapted model
and the merged weight equal the base bit for bit, and ``disabled()`` is the base model.

The rank: the paper keeps "the most critical singular values that capture over 99% of the matrix's information".
``r=None`` (the default) reads that per target as the smallest r whose top-r singular values hold ``energy`` (0.99)
of the squared Frobenius norm, ``sum_{i<=r} S_i^2 >= energy * sum_i S_i^2``; a fixed ``r`` applies to every target
instead. The per-target ranks are decided when the adapter is applied and stored in the config (``ranks``: target
key -> r), so a saved adapter rebuilds with the same shapes. On pretrained transformer weights this rule keeps most
of the spectrum (the weights are far from low rank): that is how the paper's "16 times fewer parameters than LoRA"
comes out on RoBERTa-base, whose q and v LoRA r = 8 has 8 * (768 + 768) = 12,288 parameters per matrix against
SVFit's at most 768.

Export: the update ``U_r diag(sigma - S_r) V_r^T`` is a rank-r product, written by ``vpeft.export_hf_peft`` as an
exact Hugging Face PEFT LoRA (scale 1; targets of different ranks through PEFT's ``rank_pattern``); it reads back into
vpeft as a LoRA when all targets have one rank (a fixed ``r``).

Defaults: q and v (the paper's NLU setting compares against LoRA on the query and value projections), energy 0.99.
vpeft's reading, not verified against code (none is public): the energy measure (squared singular values, i.e.
Frobenius energy; the paper says "information"), and the fixed-r option. Wraps Linear (and HF Conv1D) and
fused-projection slices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, NonNegativeInt, ProperFraction, Rank, Target
from . import _svd
from .lora import LoRAConfig


@dataclass
class SVFitConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: Rank | None = None  # None: per target, the smallest rank holding `energy` of the spectrum
    energy: ProperFraction = 0.99
    ranks: tuple[tuple[str, NonNegativeInt], ...] = ()  # target key -> rank; written when the adapter is applied


def energy_rank(S: Tensor, energy: float) -> int:
    """The smallest r with ``sum_{i<=r} S_i^2 >= energy * sum S^2`` (``S`` descending)."""
    power = S.double() ** 2
    cumulative = power.cumsum(0)
    return int((cumulative < energy * cumulative[-1]).sum().item()) + 1


def rank_of(config: Any, target: Target, method: str) -> int:
    """The rank ``prepare`` decided for ``target`` (from ``config.ranks``)."""
    ranks = dict(config.ranks)
    if target.key not in ranks:
        raise ValueError(
            f"{method} option ranks has no entry for target {target.key!r}; it is written when the adapter is "
            "applied: leave ranks unset."
        )
    return ranks[target.key]


class SVFit(AdapterModule):
    Config = SVFitConfig
    wraps = ("linear",)
    mergeable = True
    lora_variant = "lora"  # exports as a rank-r LoRA per target (lora_factors)
    dropout = None  # none: what LoRA exporters read as the dropout

    def __init__(self, target: Target, config: SVFitConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        r = rank_of(config, target, "svfit")
        U, S, V = _svd.svd(weight)
        self.register_buffer("U", U[:, :r].to(weight.dtype).contiguous(), persistent=True)  # (out, r)
        self.register_buffer("Vh", V[:, :r].T.to(weight.dtype).contiguous(), persistent=True)  # (r, in)
        self.register_buffer("S0", S[:r].to(weight.dtype).clone(), persistent=True)
        self.sigma = nn.Parameter(S[:r].to(weight.dtype).clone())

    @classmethod
    def prepare(cls, config: SVFitConfig, model: nn.Module, targets: list[Target], calibration: Any) -> SVFitConfig:
        if config.ranks:
            return config
        ranks = []
        for t in targets:
            weight, _ = t.weight_and_bias()
            if config.r is not None:
                ranks.append((t.key, min(config.r, *weight.shape)))
            else:
                ranks.append((t.key, energy_rank(_svd.svd(weight)[1], config.energy)))
        return replace(config, ranks=tuple(ranks))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + F.linear(F.linear(x, self.Vh) * (self.sigma - self.S0), self.U)

    def delta_weight(self) -> Tensor:
        return (self.U * (self.sigma - self.S0)) @ self.Vh

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """The update as a rank-r LoRA with scale 1, exactly: ``A = diag(sigma - S_r) V_r^T``, ``B = U_r``; what the
        Hugging Face PEFT export writes (targets of other ranks go to PEFT's ``rank_pattern``)."""
        return (self.sigma - self.S0)[:, None] * self.Vh, self.U, 1.0

    @classmethod
    def as_lora(cls, config: SVFitConfig) -> LoRAConfig:
        """The vpeft LoRA an exported SVFit adapter reads back as: rank r, scale 1, no dropout. One LoRA config has one
        rank, so an adapter whose ranks differ by target (the energy rule) exports to PEFT but does not read back."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(MethodConfig)}
        r = max(k for _, k in config.ranks)
        return LoRAConfig(**fields, r=r, alpha=float(r), dropout=0.0)
