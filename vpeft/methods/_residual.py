"""A LoRA that starts from a non-zero ``(A0, B0)`` and leaves the base weight untouched: the shared layer of PiSSA,
CorDA and LoRA-GA (the non-destructive residual of issue 17, SoMA's pattern).

These methods start the trainable factors at a piece of the pretrained weight (its top singular triplets, a
covariance-whitened decomposition, the gradient's) and subtract that piece from the base, ``W_res = W0 - s B0 A0``,
so the model is unchanged at initialisation. The reference code (Hugging Face PEFT's ``pissa_init``, ``corda_init``,
``lora_ga_init``) overwrites ``W0`` with ``W_res``. Here ``W0`` stays as it is and ``A0``, ``B0`` are frozen
persistent buffers:

    y = W0 x + b + s (B A x - B0 A0 x)       (= W_res x + b + s B A x)

* ``disabled()`` runs ``W0``: the base model exactly; merge adds ``s (B A - B0 A0)`` and unmerge takes it away again;
* at initialisation ``B A x - B0 A0 x`` is two identical computations, exactly zero: the adapted model equals the
  base bit for bit (the reference's ``W_res x + s B A x`` differs from ``W0 x`` by float rounding);
* the saved adapter holds ``A, B, A0, B0`` (the initial factors depend on data, on the SVD's device and signs);
* export to Hugging Face PEFT is a plain LoRA of rank 2r: ``[A; A0]`` and ``[B, -B0]`` with the same scale, which
  is what PEFT itself writes for PiSSA/CorDA/LoRA-GA with ``path_initial_model_for_weight_conversion`` (its
  ``lora_alpha`` doubles with r, so ``alpha / r`` is unchanged), and it applies to the original base weights.

A subclass's ``prepare`` computes ``(A0, B0)`` of every target and returns them as ``Prepared(config,
{target.key: (A0 (r, in), B0 (out, r))})``; each layer starts from its ``target.init``. When the adapter is rebuilt
from a saved config (a load: ``target.init is None``) the layer holds zero placeholders that the saved tensors fill,
so no SVD or calibration runs again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import WHOLE, AdapterModule, DropProbability, FiniteFloat, MethodConfig, Rank, Target
from ._blocks import dropout
from .lora import LoRAConfig


@dataclass
class ResidualConfig(MethodConfig):
    """The LoRA options every residual method shares (Hugging Face PEFT's ``LoraConfig`` fields of the same
    meaning: ``r``, ``lora_alpha``, ``lora_dropout``)."""

    targets: tuple[str, ...] = ("q", "v")
    r: Rank = 8
    alpha: FiniteFloat = 8.0  # s = alpha / r
    dropout: DropProbability = 0.0


def in_model_order(model: nn.Module, targets: list[Target]) -> list[Target]:
    """``targets`` in the order ``model.named_modules()`` lists their modules (slices of one fused projection in
    q, k, v order): the order Hugging Face PEFT initialises its layers in, which the methods that seed a randomised
    SVD per target (LoRA-GA, PiSSA's ``niter``) count positions in, so a test can seed PEFT's calls alike."""
    order = {id(m): i for i, m in enumerate(model.modules())}
    parts = {WHOLE: 0, "q": 1, "k": 2, "v": 3, "out_proj": 4}
    return sorted(targets, key=lambda t: (order.get(id(t.module), len(order)), parts.get(t.part, 5)))


class ResidualLoRA(AdapterModule):
    """``y + s (B A dropout(x) - B0 A0 dropout(x))`` with frozen ``A0 (r, in)``, ``B0 (out, r)``."""

    Config = ResidualConfig
    lora_variant = "lora"  # exports as the rank-2r LoRA of :meth:`lora_factors`
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: ResidualConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.scale = config.alpha / config.r
        self.dropout = dropout(config.dropout)
        weight, _ = target.weight_and_bias()  # (out, in)
        if target.init is None:  # rebuilt from a saved config: the saved tensors fill these
            A = weight.new_zeros(config.r, weight.shape[1])
            B = weight.new_zeros(weight.shape[0], config.r)
        else:
            A, B = (t.to(device=weight.device, dtype=weight.dtype) for t in target.init)
        self.lora_A = nn.Parameter(A.clone().contiguous())
        self.lora_B = nn.Parameter(B.clone().contiguous())
        self.register_buffer("A0", A.contiguous(), persistent=True)  # frozen: W_res = W0 - s B0 A0, never stored
        self.register_buffer("B0", B.contiguous(), persistent=True)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        # s (B A x' - B0 A0 x), x' = dropout(x): two identical computations at init (eval), so exactly zero there.
        # The residual reads x itself, as W_res x does in the reference, so dropout acts as it does there.
        low = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) - F.linear(F.linear(x, self.A0), self.B0)
        return y + (low if self.scale == 1 else self.scale * low)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A - self.B0 @ self.A0)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """The update as one LoRA of rank 2r on the original weight: ``s [B, -B0] [A; A0] = s (B A - B0 A0)``."""
        return torch.cat([self.lora_A, self.A0]), torch.cat([self.lora_B, -self.B0], dim=1), self.scale

    @classmethod
    def as_lora(cls, config: ResidualConfig) -> LoRAConfig:
        """The plain LoRA an exported adapter is (rank 2r, the same scale): what ``import_hf_peft`` rebuilds."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoRAConfig) if hasattr(config, f.name)}
        return LoRAConfig(**{**fields, "r": 2 * config.r, "alpha": 2 * config.alpha})
