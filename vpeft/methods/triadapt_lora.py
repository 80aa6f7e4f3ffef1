"""TriAdaptLoRA: triangular adaptive low-rank adaptation (Liang et al., "TriAdaptLoRA: Brain-Inspired Triangular
Adaptive Low-Rank Adaptation for Parameter-Efficient Fine-Tuning", arXiv:2501.08008).

Each module's update has a lower-triangular core between LoRA's factors, and its rank grows during training where
the update matters most:

    h = W0 x + (alpha / r0) B T A x,   A in R^{r x d_in} (Kaiming-uniform), T in R^{r x r} lower triangular
                                         (identity at the start), B in R^{d_out x r} (zeros)
    importance   I_t = ||B T A||_F / sqrt(d_out d_in)           (a normalised Frobenius norm, per module t)
    at each growth step s (every ``grow_every`` steps between ``grow_start`` and ``grow_end`` of the run):
        threshold tau(s) = tau_0 + (tau_1 - tau_0) (s - s_start) / (s_end - s_start)      (linear)
        every module with I_t / max_u I_u >= tau(s) and r_t < ``r_max`` grows by ``grow_by`` ranks

A new rank appends a row to A (Kaiming-uniform), a column to B (zeros) and a row and column to T (1 on the diagonal,
0 elsewhere), so the model's output is unchanged at the growth and the new direction receives a gradient at once (its
B column through ``T``'s diagonal). The triangular core lets a component mix the ones before it but none after, so
the components that exist are not changed by the ones that are added. The optimiser keeps the moments of the old
entries and starts the new ones at zero (vpeft/core/control.py); the ranks are recorded in the config (``ranks``, one
per target in target order), so checkpoints and saved adapters rebuild at their grown shapes. The scale is fixed at
``alpha / r0`` (the starting rank) so that growing changes no existing output.

Defaults: r0 = 4 growing to at most 12 by 2 ranks, every 50 steps from 10 % to 70 % of the run, threshold from 0.9 to
0.5 (the paper reports that linear threshold schedules work best); LoRA's targets (q, v) and dropout 0.1.

Departures: no official code is published, and the paper's exact factorisation, importance normalisation and threshold
values are not available to this project; the triangular core, the normalisation by sqrt(d_out d_in) relative to the
largest module and the defaults above are this implementation's reading of its description (a triangular split of the
transformation matrix, normalised Frobenius-norm importance, adaptive rank growth past a linearly scheduled
threshold). Not mergeable through MultiheadAttention; wraps Linear (and HF Conv1D) and fused-projection slices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import FiniteFloat, PositiveInt, ProperFraction, Rank, StepContext, Target
from ..errors import OptionError
from .lora import LoRA, LoRAConfig


@dataclass
class TriAdaptLoRAConfig(LoRAConfig):
    r: Rank = 4  # r0, the starting rank of every module
    alpha: FiniteFloat = 4.0  # the update is scaled by alpha / r0 at every rank
    r_max: PositiveInt = 12
    grow_by: PositiveInt = 2
    grow_every: PositiveInt = 50
    grow_start: ProperFraction = 0.1  # share of the run's steps before the first growth step
    grow_end: ProperFraction = 0.7  # share of the run's steps after which no module grows
    threshold_start: ProperFraction = 0.9  # tau_0, of I_t / max I
    threshold_end: ProperFraction = 0.5  # tau_1
    ranks: tuple[int, ...] = ()  # each target's rank now, in target order (empty: all r0); written by the controller

    def check(self) -> None:
        if self.r_max < self.r:
            raise OptionError(f"triadapt_lora option r_max={self.r_max} is below r={self.r}, the starting rank; "
                              f"set r_max >= {self.r}.", "r_max")  # fmt: skip
        if self.grow_end <= self.grow_start:
            raise OptionError(f"triadapt_lora option grow_end={self.grow_end} must exceed grow_start="
                              f"{self.grow_start}: growth happens between them.", "grow_end")  # fmt: skip
        if any(not self.r <= r <= self.r_max for r in self.ranks):
            raise OptionError(f"triadapt_lora option ranks {list(self.ranks)} must lie between r={self.r} and "
                              f"r_max={self.r_max}.", "ranks")  # fmt: skip


class TriAdaptLoRA(LoRA):
    Config = TriAdaptLoRAConfig
    lora_variant = None  # B T A is no plain LoRA until T is folded into B
    wraps = ("linear",)

    def __init__(self, target: Target, config: TriAdaptLoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.scale = config.alpha / config.r
        rank = config.ranks[target.position] if config.ranks else config.r
        if rank != config.r:  # rebuilt at a grown rank: shapes only, the values come from the file
            self.lora_A = nn.Parameter(torch.empty(rank, target.in_features))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(target.out_features, rank))
        self.lora_T = nn.Parameter(torch.eye(rank))
        self.position = target.position

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def core(self) -> Tensor:
        return torch.tril(self.lora_T)  # the upper triangle is never used (its gradient is zero)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.linear(F.linear(self.dropout(x), self.lora_A), self.core())
        return y + self.scale * F.linear(h, self.lora_B)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B @ self.core() @ self.lora_A)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B @ self.core(), self.scale  # T folded into B: a LoRA of the same rank

    def importance(self) -> float:
        """``||B T A||_F / sqrt(d_out d_in)``."""
        with torch.no_grad():
            delta = self.lora_B @ self.core() @ self.lora_A
            return float(delta.norm() / math.sqrt(delta.numel()))

    def grow(self, by: int, ctx: StepContext) -> None:
        """Append ``by`` ranks (see the module's text); the optimiser follows through ``ctx``."""
        r, new = self.rank, self.rank + by
        keep = torch.cat([torch.arange(r), torch.full((by,), -1)])
        fill_a = torch.empty(new, self.lora_A.shape[1], dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(fill_a, a=math.sqrt(5))
        ctx.resize(self, "lora_A", (keep, None), fill_a)
        ctx.resize(self, "lora_B", (None, keep))
        ctx.resize(self, "lora_T", (keep, keep), torch.eye(new, dtype=self.lora_T.dtype))

    @classmethod
    def control(cls, config: TriAdaptLoRAConfig, layers: list[TriAdaptLoRA], ctx: StepContext) -> str | None:
        tau = threshold(config, ctx.step, ctx.total_steps)
        if tau is None or not layers:
            return None
        scores = [layer.importance() for layer in layers]
        top = max(scores)
        if top <= 0:
            return None  # B is still zero everywhere: nothing to rank
        grown = []
        for layer, score in zip(layers, scores, strict=True):
            if score / top >= tau and layer.rank < config.r_max:
                layer.grow(min(config.grow_by, config.r_max - layer.rank), ctx)
                grown.append(layer.position)
        if not grown:
            return None
        ranks = [0] * len(layers)
        for layer in layers:
            ranks[layer.position] = layer.rank
        ctx.set_config(dataclasses.replace(config, ranks=tuple(ranks)))
        return f"triadapt_lora grew {len(grown)} modules (threshold {tau:.3f}); ranks {ranks}"


def threshold(config: TriAdaptLoRAConfig, step: int, total_steps: int) -> float | None:
    """tau at ``step`` if it is a growth step, else None."""
    start, end = round(config.grow_start * total_steps), round(config.grow_end * total_steps)
    if step < start or step > end or step == 0 or (step - start) % config.grow_every:
        return None
    t = (step - start) / max(1, end - start)
    return config.threshold_start + (config.threshold_end - config.threshold_start) * t
