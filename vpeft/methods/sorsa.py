"""SORSA: singular values and orthonormal regularised singular vectors adaptation (Cao, "SORSA: Singular Values and
Orthonormal Regularized Singular Vectors Adaptation of Large Language Models", arXiv:2409.00055; official code
``Gunale0926/SORSA``, ``sorsalib/src/sorsa/{layer,trainer}.py``).

Each target weight's float32 SVD ``W = U S V^T`` (taken when the adapter is built, on the loaded weight) gives the
principal part, which trains, and the residual, which stays frozen (the official ``sorsa_init``):

    A = V_p^T (r, in),  S = S_p (r,),  B = U_p (out, r),    W_r = W - s B0 diag(S0) A0
    y = W_r x + s B diag(S) A x = W x + s (B diag(S) A - B0 diag(S0) A0) x

with ``s = alpha / r`` (``alpha=None``: s = 1, the official default). A0, S0, B0 (the initial factors) are frozen
persistent buffers, so the residual is never stored as a matrix, the base weight stays untouched (``disabled()``,
unmerge) and at init the update is exactly zero: the adapted model and the merged weight equal the base bit for bit.

**Orthonormal regulariser and its schedule** (the official ``calc_ortho`` and trainer): the mean over all adapted
A and B of ``||A A^T - I_r||_F`` and ``||B^T B - I_r||_F`` (:meth:`SORSA.orthonormal_penalty`), whose gradient is
added with weight ``gamma / lr`` *after* gradient clipping and before the optimizer step, in a separate backward
pass: the step it causes is then about ``gamma`` whatever the learning rate (the paper's decoupling). Here that
runs in ``on_step``, which the training loop calls at exactly that point (after clipping, before ``optimizer.step``);
``lr`` is the learning rate the optimizer was configured with (``initial_lr`` of the param group that holds the
adapter, set by torch's schedulers; its ``lr`` when there is no scheduler), as the official trainer reads
``args.learning_rate`` and not the scheduled value. It is not the method's ``loss``: a loss term would be scaled by
gradient accumulation and clipped with the task gradient, which the official code avoids. Without an optimizer
(``on_step(model, step, total)``) or with ``gamma=0`` nothing is added.

Defaults: the official Llama-2-7B run (``scripts/train_sorsa.sh``, ``run.py``): r = 128, alpha None, dropout 0,
gamma 4e-4 (lr 3e-5, no weight decay), targets q, k, v, o and the MLP's up and down projections (the official list
also has Llama's ``gate_proj``, which no vpeft role names: add ``mlp.gate_proj`` to ``targets`` for it).

Export: the update is one rank-2r product, ``[B, B0] [diag(S) A; -diag(S0) A0]``, so ``vpeft.export_hf_peft``
writes it as an exact Hugging Face PEFT LoRA of rank 2r (and ``vpeft.import_hf_peft`` reads it back as a vpeft LoRA).

Departures: the official code computes the residual in bfloat16 (``weight_dtype=torch.bfloat16``); here the base
weight is not rewritten at all. No dropout option (the official runs use 0). Under DDP every process adds the same
regulariser gradient to its averaged gradient (the factors are replicated), as the official trainer does; FSDP's
sharded parameters are not handled by this hook (untested there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, FiniteFloat, MethodConfig, NonNegativeFloat, Rank, Target
from . import _svd
from .lora import LoRAConfig


@dataclass
class SORSAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    r: Rank = 128
    alpha: FiniteFloat | None = None  # s = alpha / r; None: s = 1
    gamma: NonNegativeFloat = 4e-4  # the orthonormal regulariser's weight, divided by the learning rate


class SORSA(AdapterModule):
    Config = SORSAConfig
    wraps = ("linear",)
    mergeable = True
    lora_variant = "lora"  # exports as a rank-2r LoRA (lora_factors)
    dropout = None  # none: what LoRA exporters read as the dropout

    def __init__(self, target: Target, config: SORSAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        r = config.r
        self.scale = 1.0 if config.alpha is None else config.alpha / r
        U, S, V = _svd.svd(weight)
        A, s, B = V[:, :r].T.contiguous(), S[:r].clone(), U[:, :r].contiguous()
        A, s, B = A.to(weight.dtype), s.to(weight.dtype), B.to(weight.dtype)
        self.sorsa_A, self.sorsa_S, self.sorsa_B = nn.Parameter(A.clone()), nn.Parameter(s.clone()), nn.Parameter(B)
        self.register_buffer("A0", A, persistent=True)  # W_r = W - s B0 diag(S0) A0; saved: the SVD is device-dependent
        self.register_buffer("S0", s, persistent=True)
        self.register_buffer("B0", B.clone(), persistent=True)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        # two identical computations: exactly zero while A, S, B equal A0, S0, B0
        now = F.linear(F.linear(x, self.sorsa_A) * self.sorsa_S, self.sorsa_B)
        start = F.linear(F.linear(x, self.A0) * self.S0, self.B0)
        return y + self.scale * (now - start)

    def delta_weight(self) -> Tensor:
        return self.scale * ((self.sorsa_B * self.sorsa_S) @ self.sorsa_A - (self.B0 * self.S0) @ self.A0)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """The update as one rank-2r LoRA, exactly: ``A = [diag(S) A; -diag(S0) A0]`` (2r, in),
        ``B = [B, B0]`` (out, 2r), with the scale s; what the Hugging Face PEFT export writes."""
        a = torch.cat([self.sorsa_S[:, None] * self.sorsa_A, -(self.S0[:, None] * self.A0)])
        return a, torch.cat([self.sorsa_B, self.B0], 1), self.scale

    @classmethod
    def as_lora(cls, config: SORSAConfig) -> LoRAConfig:
        """The vpeft LoRA an exported SORSA adapter reads back as: rank 2r, the same scale, no dropout."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(MethodConfig)}
        scale = 1.0 if config.alpha is None else config.alpha / config.r
        return LoRAConfig(**fields, r=2 * config.r, alpha=2 * config.r * scale, dropout=0.0)

    @staticmethod
    def orthonormal_penalty(layers: list[AdapterModule]) -> Tensor | None:
        """``mean over A and B of ||A A^T - I||_F, ||B^T B - I||_F`` (the official ``calc_ortho``), or None."""
        terms = []
        for layer in layers:
            a, b = layer.sorsa_A, layer.sorsa_B
            terms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)))
            terms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], dtype=b.dtype, device=b.device)))
        return torch.stack(terms).mean() if terms else None

    @classmethod
    def on_step(
        cls, config: SORSAConfig, layers: list[AdapterModule], step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        """Add ``gamma / lr`` times the gradient of :meth:`orthonormal_penalty` to the factors' gradients."""
        if optimizer is None or config.gamma == 0 or not layers:
            return
        factors = [p for layer in layers for p in (layer.sorsa_A, layer.sorsa_B)]
        lr = _configured_lr(optimizer, factors)
        if lr is None or lr <= 0:
            return
        with torch.enable_grad():
            penalty = cls.orthonormal_penalty(layers)
            grads = torch.autograd.grad(penalty * (config.gamma / lr), factors)
        with torch.no_grad():
            for p, g in zip(factors, grads, strict=True):
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)


def _configured_lr(optimizer: Any, params: list[Tensor]) -> float | None:
    """The learning rate the optimizer was built with for ``params``: its group's ``initial_lr`` (kept by torch's LR
    schedulers), else its ``lr``."""
    mine = {id(p) for p in params}
    for group in optimizer.param_groups:
        if any(id(p) in mine for p in group["params"]):
            return float(group.get("initial_lr", group["lr"]))
    return None
