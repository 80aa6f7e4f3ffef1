"""SSF: scaling and shifting your features (Lian, Zhou, Feng and Wang, "Scaling & Shifting Your Features: A New
Baseline for Efficient Model Tuning", NeurIPS 2022, arXiv:2210.08823).

    y = gamma * base(x) + beta,    gamma ~ N(1, 0.02^2), beta ~ N(0, 0.02^2)   (per output channel)

The init is the official ``init_ssf_scale_shift`` (``models/vision_transformer.py``), so the adapted model is *not*
the base model at initialisation (``identity_at_init = False``). Placement is the official ``tuning_mode='ssf'``
one: after ``patch_embed.proj``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``, ``norm2`` and the
final ``norm``: 12 * 2 * (768 + 2304 + 768 + 3072 + 768 + 768) + 2 * 768 + 2 * 768 = 205,824 parameters on
ViT-B/16 (the paper's 0.21M). The official code puts the patch-embedding pair after ``proj`` and the flatten; on the
conv output (channel dim 1) that is the same operation. The official ``patch_embed.norm`` pair exists only when the
patch embedding has a norm (not in ViT-B); the final-norm pattern is anchored (``^norm$``) because a bare ``norm``
would also match timm's ``patch_embed.norm`` Identity.

Wraps Linear (and HF Conv1D, fused slices), Conv2d (channel dim 1) and affine norms (LayerNorm: last dim; GroupNorm
and BatchNorm: dim 1). Mergeable and exact: ``W' = diag(gamma) W`` (per output channel, also for conv kernels and
norm weights) and ``b' = gamma * b + beta``; unmerging divides by gamma. The merge needs a base bias to absorb beta,
so ``accepts`` skips modules without one (as BitFit does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, NonNegativeFloat, Target


@dataclass
class SSFConfig(MethodConfig):
    targets: tuple[str, ...] = (
        "patch_embed.proj",
        "attn.qkv",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
        "norm1",
        "norm2",
        "^norm$",
    )
    init_std: NonNegativeFloat = 0.02  # std of gamma around 1 and of beta around 0 (official init)


class SSF(AdapterModule):
    Config = SSFConfig
    wraps = ("linear", "conv2d", "norm")
    mergeable = True
    identity_at_init = False

    def __init__(self, target: Target, config: SSFConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        n = target.out_features
        self.scale = nn.Parameter(torch.empty(n))  # gamma (out,)
        self.shift = nn.Parameter(torch.empty(n))  # beta (out,)
        nn.init.normal_(self.scale, mean=1.0, std=config.init_std)
        nn.init.normal_(self.shift, mean=0.0, std=config.init_std)
        # LayerNorm / Linear outputs carry channels last; conv, GroupNorm and BatchNorm outputs on dim 1
        last = target.kind == "linear" or isinstance(target.module, (nn.LayerNorm, nn.RMSNorm))
        self.channel_dim = -1 if last else 1

    @classmethod
    def accepts(cls, target: Target, config: SSFConfig) -> bool:
        """layers with a weight and a bias (merging folds the shift into the bias)."""
        m = target.module
        return getattr(m, "bias", None) is not None and getattr(m, "weight", None) is not None

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        return t if self.channel_dim == -1 else t.view(-1, *([1] * (ndim - 2)))  # (C, 1, ..., 1) for (B, C, ...)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y * self._view(self.scale, y.dim()) + self._view(self.shift, y.dim())

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g = self.scale.to(weight.dtype)
        w = weight * g.view(-1, *([1] * (weight.dim() - 1)))  # scale output rows of (out, ...) weights
        return w, bias * g.to(bias.dtype) + self.shift.to(bias.dtype)

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        g = self.scale.to(weight.dtype)
        w = weight / g.view(-1, *([1] * (weight.dim() - 1)))
        return w, (bias - self.shift.to(bias.dtype)) / g.to(bias.dtype)
