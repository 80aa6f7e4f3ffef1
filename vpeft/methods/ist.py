"""IST: importance-aware sparse tuning (Yao et al., "Layer-wise Importance Matters: Less Memory for Better Performance
in Parameter-efficient Fine-tuning of Large Language Models", Findings of EMNLP 2024, arXiv:2410.11772).

A LoRA on every block, of which only k of the L blocks train at each step; which ones is drawn from an importance
score per block, and the scores are kept up to date by suppressing the response of the blocks that trained:

    P(block l is drawn) = softmax(z)_l,   z_l = (I_l - mean I) / (std I * tau)   (k drawn without replacement)
    every ``update_every`` steps, for each block l that trained in the step before:
        d_l = L(batch; adapters of block l suppressed) - L(batch),    I_l <- m I_l + (1 - m) d_l

so a block whose adapters the loss depends on more (d_l large) is drawn more often. The blocks not drawn are frozen for
the step (``requires_grad`` off: no gradient is computed for them, and the optimiser skips them with their moments
kept), which is where the method saves memory for gradients and optimiser work. The update of each module is LoRA's,
``h = W0 x + (alpha / r) B A x``; the adapter saves, loads, merges and exports as a LoRA (plus its scores).

Defaults: LoRA's (r = 8 on q and v, dropout 0.1); k = 25 % of the blocks (``fraction``), scores refreshed every 10
steps (``update_every``) with momentum m = 0.9 and temperature tau = 1, on the step's first batch, in eval mode (no
dropout, so the difference is that of the suppression alone).

Departures (the official repository, ``Kaiseem/IST``, holds no code; the paper's text is the source): the paper
scores the sampled layers with a reinforcement-style update of their selection probabilities; here the score is the
loss increase measured directly by suppression, as the paper's "response suppression" describes, turned into
probabilities by a standardised softmax. Draws come from a generator seeded with (``seed``, step), so a resumed run
draws the same blocks. Blocks are the targets' block indices (the first integer in a module's path); targets outside
any block form one group of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import NonNegativeInt, PositiveFloat, PositiveInt, ProperFraction, StepContext, Target
from .lora import LoRA, LoRAConfig


@dataclass
class ISTConfig(LoRAConfig):
    fraction: ProperFraction = 0.25  # share of the blocks that train at each step (k = round(fraction * L), >= 1)
    update_every: PositiveInt = 10  # steps between importance refreshes
    momentum: ProperFraction = 0.9  # m: weight of the old score
    temperature: PositiveFloat = 1.0  # tau: of the softmax over standardised scores
    seed: NonNegativeInt = 0


class IST(LoRA):
    Config = ISTConfig
    lora_variant = None  # the scores are not LoRA's; the update is, and merges as one
    wraps = ("linear",)

    def __init__(self, target: Target, config: ISTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.block = -1 if target.index is None else target.index
        self.suppressed = False  # True while the controller measures the loss without this block's response
        self.register_buffer("ist_score", torch.zeros(()))  # I_l of this module's block (saved: resumes exactly)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.suppressed else super().adapt_output(x, y)

    @classmethod
    def control(cls, config: ISTConfig, layers: list[IST], ctx: StepContext) -> str | None:
        blocks = blocks_of(layers)
        if ctx.step > 0 and ctx.step % config.update_every == 0 and ctx.loss is not None:
            # the blocks of the step before, drawn again from the scores they were drawn from (unchanged since the
            # last refresh), not read from requires_grad: a resumed run rebuilds the model with every block trainable
            trained = sorted(draw_blocks(config, blocks, ctx.step - 1))
            update_scores(config, blocks, trained, ctx)
        chosen = draw_blocks(config, blocks, ctx.step)
        for b, group in blocks.items():
            for layer in group:
                layer.requires_grad_(b in chosen)
        return f"ist trains blocks {sorted(chosen)}"


def blocks_of(layers: list[IST]) -> dict[int, list[IST]]:
    out: dict[int, list[IST]] = {}
    for layer in layers:
        out.setdefault(layer.block, []).append(layer)
    return dict(sorted(out.items()))


def probabilities(config: ISTConfig, scores: Tensor) -> Tensor:
    """softmax of the standardised scores over tau; uniform while all scores are equal (at the start)."""
    spread = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    if not torch.isfinite(spread) or spread <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return torch.softmax((scores - scores.mean()) / (spread * config.temperature), dim=0)


def draw_blocks(config: ISTConfig, blocks: dict[int, list[IST]], step: int) -> set[int]:
    """The k blocks that train at ``step``: drawn without replacement from :func:`probabilities`."""
    names = list(blocks)
    k = max(1, round(config.fraction * len(names)))
    scores = torch.stack([group[0].ist_score.detach().double().cpu() for group in blocks.values()])
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    picked = torch.multinomial(probabilities(config, scores), k, replacement=False, generator=generator)
    return {names[i] for i in picked.tolist()}


@torch.no_grad()
def update_scores(config: ISTConfig, blocks: dict[int, list[IST]], trained: list[int], ctx: StepContext) -> None:
    """``I_l <- m I_l + (1 - m) (L(suppressed l) - L)`` for each block l that trained, on the step's batch, in eval
    mode (deterministic: no dropout)."""
    model, was = ctx.model, ctx.model.training
    model.eval()
    try:
        base = float(ctx.loss(ctx.batch))
        for b in trained:
            for layer in blocks[b]:
                layer.suppressed = True
            try:
                delta = float(ctx.loss(ctx.batch)) - base
            finally:
                for layer in blocks[b]:
                    layer.suppressed = False
            if math.isfinite(delta):
                for layer in blocks[b]:
                    layer.ist_score.mul_(config.momentum).add_((1 - config.momentum) * delta)
    finally:
        model.train(was)


def scores(layers: list[Any]) -> dict[int, float]:
    """Each block's importance score, for reports and tests."""
    return {b: float(group[0].ist_score) for b, group in blocks_of(layers).items()}
