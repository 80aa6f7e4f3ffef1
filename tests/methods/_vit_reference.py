"""A hand-written timm ViT forward for the method tests: the embedding, a caller-supplied block, the final norm, the
pooling and the head, each applied with the *unadapted* model's submodules."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def reference_forward(
    base: nn.Module,
    images: Tensor,
    block: Callable[[int, nn.Module, Tensor], Tensor],
    pool: Callable[[Tensor], Tensor] | None = None,
    embed: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits of ``base`` with ``x = block(i, base.blocks[i], x)`` in place of each block."""
    x = base.norm_pre(base._pos_embed(base.patch_embed(images)))  # (B, 1 + N, D)
    if embed is not None:
        x = embed(x)
    for i, blk in enumerate(base.blocks):
        x = block(i, blk, x)
    x = base.norm(x)
    x = pool(x) if pool is not None else x[:, 0]  # class-token head
    return base.head(base.fc_norm(x))


def plain_block(blk: nn.Module, x: Tensor) -> Tensor:
    x = x + blk.attn(blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def perturb(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Move every trainable adapter tensor off its initial value (zero-initialised factors included); the head copy
    stays equal to the base head, so :func:`reference_forward` can use the base head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(std * torch.randn(p.shape, generator=g))
