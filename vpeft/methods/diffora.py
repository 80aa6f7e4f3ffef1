"""DiffoRA: differentiable module selection for LoRA (Jiang et al., "DiffoRA: Enabling Parameter-Efficient LLM
Fine-Tuning via Differential Low-Rank Matrix Adaptation", arXiv:2502.08905).

Every candidate module m carries a LoRA and a gate, the entry of the Differential Adaptation Matrix (DAM) for it;
the gates are learnt DARTS-style on held-out data while the LoRA weights learn on the training data, then the DAM is
discretised: the modules with the largest gates keep their LoRA, the others lose it.

    search:      h = W0 x + sigmoid(g_m) (alpha / r) B_m A_m x
                 each step: g <- g - eta_g dL_val/dg   (one validation batch; first-order bilevel step)
                            (A, B) <- optimiser step on dL_train/d(A, B)   (the gates take no training step)
    discretise:  keep the ceil(keep * M) modules of largest sigmoid(g_m); B_m <- sigmoid(g_m) B_m for them (the
                 output does not jump), rank 0 for the others (their tensors are dropped, and the optimiser's state
                 of them); the gates are dropped.
    fine-tune:   h = W0 x + (alpha / r) B_m A_m x on the kept modules (LoRA).

The gates' learning on the validation split is the bilevel problem's upper level with DARTS's first-order
approximation (the lower level's solution is the current weights); all candidates share one set of LoRA weights
while the gates learn (the paper's weight sharing), so the search costs one training run's steps plus one validation
forward and backward per search step. Without a validation split the gate step uses the training batch. The kept
modules are recorded in the config (``ranks``: r or 0 per target, and ``discretised``), so saved adapters and
checkpoints rebuild the selection.

Defaults: candidates q, k, v, the attention output and both MLP projections, LoRA r = 8, alpha = 8, dropout 0.1; the
search lasts the first 20 % of the steps with gate learning rate 0.1, then half of the modules are kept.

Departures: the paper's code is not public and its exact equations were not available to this project: the sigmoid
gate, the plain gradient step on the gates (stateless, so a resumed run is exact), the fold of the final gate into B,
and the defaults above are this implementation's reading of its description (continuous relaxation of a module mask,
weight sharing, discretisation). The gates are excluded from the optimiser's step by dropping their training-loss
gradient (``on_step``) rather than by a separate parameter set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import PositiveFloat, ProperFraction, StepContext, Target
from ..errors import OptionError
from .lora import LoRA, LoRAConfig


@dataclass
class DiffoRAConfig(LoRAConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    keep: ProperFraction = 0.5  # share of the candidate modules that keep their LoRA
    search: ProperFraction = 0.2  # share of the run's steps in which the gates learn
    gate_lr: PositiveFloat = 0.1  # eta_g
    ranks: tuple[int, ...] = ()  # after discretisation: r (kept) or 0 (dropped) per target, in target order
    discretised: bool = False

    def check(self) -> None:
        if self.ranks and any(r not in (0, self.r) for r in self.ranks):
            raise OptionError(f"diffora option ranks {list(self.ranks)} may hold only r={self.r} (a kept module) "
                              "and 0 (a dropped one).", "ranks")  # fmt: skip


class DiffoRA(LoRA):
    Config = DiffoRAConfig
    lora_variant = None  # a gated LoRA until discretised
    wraps = ("linear",)

    def __init__(self, target: Target, config: DiffoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.position = target.position
        rank = config.ranks[target.position] if config.ranks else config.r
        if rank == 0:
            self.lora_A = nn.Parameter(torch.empty(0, target.in_features))
            self.lora_B = nn.Parameter(torch.empty(target.out_features, 0))
        self.gate = nn.Parameter(torch.zeros(0 if config.discretised else 1))  # g_m, logit; empty once discretised

    def factor(self) -> Tensor | float:
        return torch.sigmoid(self.gate)[0] if self.gate.numel() else 1.0

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if self.lora_A.shape[0] == 0:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y + (self.scale * self.factor()) * update

    def delta_weight(self) -> Tensor:
        return (self.scale * self.factor()) * (self.lora_B @ self.lora_A)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B * self.factor(), self.scale

    @classmethod
    def on_step(cls, config: DiffoRAConfig, layers: list[DiffoRA], step: int, total_steps: int, optimizer: Any = None):
        for layer in layers:  # the gates learn on validation data only (control), never from the training loss
            layer.gate.grad = None

    @classmethod
    def control(cls, config: DiffoRAConfig, layers: list[DiffoRA], ctx: StepContext) -> str | None:
        if config.discretised or not layers:
            return None
        if ctx.step < search_steps(config, ctx.total_steps):
            gate_step(config, layers, ctx)
            return None
        kept = discretise(config, layers, ctx)
        return f"diffora kept {len(kept)} of {len(layers)} modules: {kept}"


def search_steps(config: DiffoRAConfig, total_steps: int) -> int:
    return max(1, round(config.search * total_steps))


def gate_step(config: DiffoRAConfig, layers: list[DiffoRA], ctx: StepContext) -> None:
    """``g <- g - eta_g dL/dg`` on validation batch number ``step`` (the training batch without validation data)."""
    if ctx.loss is None:
        return
    batch = ctx.val_batch(ctx.step) if ctx.val_batch is not None else ctx.batch
    gates = [layer.gate for layer in layers]
    grads = torch.autograd.grad(ctx.loss(batch), gates, allow_unused=True)
    with torch.no_grad():
        for gate, grad in zip(gates, grads, strict=True):
            if grad is not None:
                gate.sub_(config.gate_lr * grad)


def discretise(config: DiffoRAConfig, layers: list[DiffoRA], ctx: StepContext) -> list[int]:
    """Keep the ``ceil(keep * M)`` modules of largest gate (ties: the earlier module), fold their gate into B, drop
    the others' tensors and every gate; returns the kept targets' positions."""
    count = max(1, math.ceil(config.keep * len(layers)))
    order = sorted(layers, key=lambda layer: (-float(layer.gate.detach()[0]), layer.position))
    kept = {layer.position for layer in order[:count]}
    empty = torch.zeros(0, dtype=torch.long)
    for layer in layers:
        if layer.position in kept:
            with torch.no_grad():
                layer.lora_B.mul_(torch.sigmoid(layer.gate[0]))
        else:
            ctx.resize(layer, "lora_A", (empty, None))
            ctx.resize(layer, "lora_B", (None, empty))
        ctx.resize(layer, "gate", (empty,))
    ranks = tuple(config.r if p in kept else 0 for p in range(len(layers)))
    ctx.set_config(dataclasses.replace(config, ranks=ranks, discretised=True))
    return sorted(kept)
