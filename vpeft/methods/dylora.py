"""DyLoRA: dynamic search-free low-rank adaptation (Valipour, Rezagholizadeh, Kobyzev and Ghodsi, "DyLoRA: Parameter
Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", EACL 2023, arXiv:2210.07558):

    b ~ p_B = Uniform{1, ..., r}  (one rank per training step, shared by every target)
    h = W0 x + (alpha / b) B[:, :b] A[:b, :] x,    A in R^{r x d_in} (Kaiming-uniform), B in R^{d_out x r} (zeros)

so one training run orders the rank-one components of a LoRA by importance (nested dropout): the adapter truncated to
any rank b <= r is a LoRA of rank b, with no search over r. In "frozen" mode (the official GLUE script trains with
``set_rank(b, frozen=True)``) only row b of A and column b of B receive the gradient of a step; rows < b are used but
detached. ``frozen=False`` trains all of the first b rows and columns. Outside training the adapter runs at
``eval_rank`` (default r), and merges, saves and exports there: ``W0 + (alpha / b) B[:, :b] A[:b]`` is exact, and a
DyLoRA at rank b exports to Hugging Face PEFT as a plain LoRA of rank b with ``lora_alpha = alpha``. Parameters are
LoRA's, ``r (d_in + d_out)`` per target; a target at rank b is the same computation as a rank-b LoRA (no extra
cost). :func:`set_eval_rank` changes the rank of a trained adapter in place, so one adapter is evaluated at every
rank <= r.

The rank is drawn in :meth:`DyLoRA.on_step`, which the training loop calls before each optimizer step: it draws the
rank of the next step; the first step's rank is drawn when the adapter is built. A training loop of one's own calls
``vpeft.on_step(model, step, total_steps)`` after each backward pass, or every step trains at the first rank.

Defaults: LoRA's (r = 8 on q and v, dropout 0.1) with the paper's GLUE setting alpha = 16 (``--lora_r 8
--lora_alpha 16`` in the official RoBERTa scripts), ``frozen=True``, ``eval_rank`` None (= r).

Departures from the official code (``huawei-noah/Efficient-NLP``, ``DyLoRA/loralib``): it scales both truncated
factors by ``sqrt(r / b)`` on top of LoRA's ``alpha / r``; the product is the same ``alpha / b`` applied here once.
It draws the rank from torch's global generator; here the rank of step s is drawn from a generator seeded with
(``seed``, s), so a run's ranks do not depend on, or disturb, any other random draw, and every process of a
distributed run trains the same rank. Its evaluation rank is the last
rank drawn in training unless set; here it is ``eval_rank``. Wraps Linear (and HF Conv1D) and fused-projection
slices; DP-DyLoRA's server-side rank per round is a federated recipe outside this layer.

Every rank of one adapter, on a tiny model: the 2-layer, 32-wide random Llama of ``tests/lm/models.py``, q and v,
r = 8, alpha = 16, no dropout, AdamW lr 3e-2 for 100 steps of 8 sequences that count up from a random token; mean
next-token loss on 4 held-out batches (``python -m tests.methods.test_dylora``, this 2-core CPU; tiny, not a
benchmark). Frozen model: 4.11; LoRA trained at r = 1: 3.95, at r = 8: 3.74.

    rank b            1     2     3     4     5     6     7     8
    frozen=True    4.04  4.00  3.98  3.96  3.96  3.95  3.95  3.94
    frozen=False   4.02  3.95  3.91  3.87  3.84  3.83  3.82  3.82

Every rank beats the frozen model and the loss falls with the rank: the components are ordered. In so short a run
the nested training costs accuracy at r against a LoRA trained at r alone (frozen mode most: one row per step).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import FiniteFloat, NonNegativeInt, PositiveInt, Target, active_adapter, adapter_record, layers_of
from ..errors import ConfigError, OptionError
from .lora import LoRA, LoRAConfig


@dataclass
class DyLoRAConfig(LoRAConfig):
    alpha: FiniteFloat = 16.0  # the update at rank b is scaled by alpha / b
    eval_rank: PositiveInt | None = None  # the rank outside training (merge, save, export); None: r
    frozen: bool = True  # train only row/column b of the step's rank b (the official code's setting)
    seed: NonNegativeInt = 0  # the rank of step s is drawn from a generator seeded with (seed, s)

    def check(self) -> None:
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise OptionError(
                f"dylora option eval_rank={self.eval_rank} exceeds r={self.r}: the adapter holds ranks 1 to r, so "
                f"eval_rank must be at most {self.r} (or None for r).",
                "eval_rank",
            )


def draw_rank(config: DyLoRAConfig, step: int) -> int:
    """The rank b of training step ``step``, uniform on {1, ..., r}: a function of (``seed``, ``step``) only."""
    return random.Random(config.seed * 1_000_003 + step).randint(1, config.r)


class DyLoRA(LoRA):
    Config = DyLoRAConfig
    wraps = ("linear",)

    def __init__(self, target: Target, config: DyLoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.alpha, self.r, self.frozen = config.alpha, config.r, config.frozen
        self.train_rank = draw_rank(config, 0)  # the first step's rank; on_step draws the next ones
        self.eval_rank = config.eval_rank or config.r

    @property
    def rank(self) -> int:
        """The rank this module runs at now: the step's in training, ``eval_rank`` otherwise."""
        return self.train_rank if self.training else self.eval_rank

    @property
    def scale(self) -> float:  # alpha / b at the current rank (LoRA keeps one fixed alpha / r)
        return self.alpha / self.rank

    @scale.setter
    def scale(self, value: float) -> None:  # LoRA's __init__ sets alpha / r; the rank decides it here
        pass

    def factors(self) -> tuple[Tensor, Tensor]:
        """``A[:b]`` (b, in) and ``B[:, :b]`` (out, b) at the current rank b; in frozen training only row b of A
        and column b of B carry a gradient."""
        b = self.rank
        a, w = self.lora_A[:b], self.lora_B[:, :b]
        if self.training and self.frozen and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]])
            w = torch.cat([w[:, :-1].detach(), w[:, -1:]], dim=1)
        return a, w

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        b = self.eval_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        a, w = self.factors()
        return y + self.scale * F.linear(F.linear(self.dropout(x), a), w)

    def delta_weight(self) -> Tensor:
        a, w, scale = self.lora_factors()  # merging is for inference: at the evaluation rank
        return scale * (w @ a)

    @classmethod
    def on_step(
        cls, config: DyLoRAConfig, layers: list[DyLoRA], step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        rank = draw_rank(config, step + 1)  # the gradient of step ``step`` is computed: draw the next step's rank
        for layer in layers:
            layer.train_rank = rank

    @classmethod
    def as_lora(cls, config: DyLoRAConfig) -> LoRAConfig:
        """The LoRA this adapter is at its evaluation rank b: rank b, the same alpha (so the scale alpha / b)."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoRAConfig)}
        return LoRAConfig(**{**fields, "r": config.eval_rank or config.r})


def set_eval_rank(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Run adapter ``name`` (default: the active one, a dylora adapter) at ``rank`` outside training, and record it
    in its config, so that saving, merging and export use that rank too."""
    name = name or active_adapter(model)
    record = adapter_record(model, name)
    if not issubclass(record.method_cls, DyLoRA):
        raise ConfigError(f"adapter {name!r} is a {record.method!r} adapter; only a dylora adapter has an eval_rank.")
    if not 1 <= rank <= record.config.r:
        raise OptionError(
            f"dylora eval_rank={rank} is outside 1 to r={record.config.r}, the ranks adapter {name!r} holds.",
            "eval_rank",
        )
    record.config = dataclasses.replace(record.config, eval_rank=rank)
    for layer in layers_of(model, name):
        layer.eval_rank = rank
