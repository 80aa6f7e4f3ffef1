"""AdamW over the trainable tensors, and the per-step cosine schedule with linear warmup.

No weight decay for biases and norm weights (tensors with one dimension), for tokens (timm's ``no_weight_decay()``
names: ``pos_embed``, ``cls_token``...) and for the tensors a method keeps out of decay (VPT's prompts).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core import no_weight_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    keep_out = no_weight_decay(model)
    base_tokens = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        token = name.split(".")[-1] in base_tokens or name in base_tokens
        (no_decay if p.ndim <= 1 or token or id(p) in keep_out else decay).append(p)
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """lr rises linearly over ``warmup_steps`` optimizer steps, then follows a cosine to ``min_lr`` at the last."""
    base_lr = optimizer.param_groups[0]["lr"]
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
