"""The run's optimiser (``optim.name``, from the registry in :mod:`vpeft.optim`) and the per-step cosine schedule
with linear warmup.

No weight decay for biases and norm weights (tensors with one dimension), for tokens (timm's ``no_weight_decay()``
names: ``pos_embed``, ``cls_token``...) and for the tensors a method keeps out of decay (VPT's prompts); a method's
learning-rate multipliers and ``optim.head_lr`` give groups of their own (:func:`vpeft.optim.param_groups`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..optim import build_optimizer as _build
from ..optim import param_groups

__all__ = ["build_optimizer", "cosine_with_warmup", "param_groups"]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    name: str = "adamw",
    head_lr: float | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Optimiser ``name`` (``adamw``: ``torch.optim.AdamW``) over the trainable tensors of ``model``; the task
    head at ``head_lr`` when given."""
    return _build(model, name, lr=lr, weight_decay=weight_decay, betas=betas, head_lr=head_lr, **options)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr rises linearly over ``warmup_steps`` optimizer steps, then follows a cosine to ``min_lr`` at the last
    (``min_lr`` is that of the run's lr; a group at a multiple of it ends at the same multiple of ``min_lr``)."""
    base_lr = optimizer.defaults["lr"]
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
