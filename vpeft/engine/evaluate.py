"""Classification evaluation: loss, top-1 and top-5 accuracy (in percent) over a loader."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics over ``loader``; ``reduce`` sums the counts over data-parallel processes that each saw a shard."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, items
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits1 = (top[:, 0] == labels).sum().item()
        hits5 = (top == labels[:, None]).any(dim=1).sum().item()
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        sums += torch.tensor([loss, hits1, hits5, labels.numel()], dtype=torch.float64)
    model.train(was_training)
    loss_sum, correct1, correct5, total = (reduce(sums) if reduce else sums).tolist()
    if total == 0:
        raise ValueError("evaluation split is empty")
    return {"loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
