"""Convpass: convolutional bypasses (Jie and Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters",
arXiv:2207.07039, 2022).

    x <- x + attn(norm1(x)) + s * f_attn(norm1(x))
    x <- x + mlp(norm2(x))  + s * f_mlp(norm2(x))
    f(u) = W_up dropout(qgelu(conv3x3(qgelu(W_down u))))

``W_down`` (D -> 8) is Xavier-uniform with a zero bias, ``W_up`` (8 -> D) and its bias are zeros, so the adapted model
equals the base model at initialisation; qgelu is QuickGELU, ``x * sigmoid(1.702 x)``, and dropout is 0.1. The 3x3
conv (8 -> 8, padding 1) runs on the patch tokens laid out on their h x w grid; each prefix (class) token goes through
the same conv as a 1 x 1 image, so only the centre tap and the bias act on it. Parameters on ViT-B/16: per bypass
6,152 + 584 + 6,912 = 13,648; two per block, 24 in all: 327,552. Not mergeable (activations and a spatial conv).

Defaults: bottleneck 8 (the paper's and the code's only setting). ``scale`` and the conv init are tuned per task in
the official ``configs/convpass/*.yaml``; of the 11 released VTAB configs the scales are {0.01, 0.1 x3, 1 x3, 10 x3,
100}, so the default is their median, s = 1, and 6 of the 11 use a Xavier conv (``conv_init="xavier"``, the default)
while the others start it as the identity (zero kernel with ``I`` on the centre tap, ``conv_init="identity"``).

Grid: the wrapped module sees ``num_prefix_tokens + h * w`` tokens; the grid is taken to be square (h = w =
sqrt(tokens - prefix)), as for timm ViTs at their native resolution. Set ``num_prefix_tokens`` for models with
register or distillation tokens (timm's ``model.num_prefix_tokens``). A model without a patch embedding (a language
model) has no grid and is refused before anything changes.

Against the official code: it hard-codes a 14 x 14 grid and one class token; the grid here follows the token count.
Official Convpass draws its own drop-path mask for each bypass; here the bypass sits inside the wrapped sub-block, so
timm's drop path (when training with one) drops the sub-block and its bypass together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, NonNegativeInt, PositiveInt, Target
from ..errors import ConfigError
from ._blocks import dropout, quick_gelu, require_patch_grid

CONV_INITS = ("xavier", "identity")


@dataclass
class ConvpassConfig(MethodConfig):
    targets: tuple[str, ...] = ("attn", "mlp")
    dim: PositiveInt = 8  # bottleneck channels
    scale: FiniteFloat = 1.0  # s, tuned per task in the official configs
    conv_init: Literal[CONV_INITS] = "xavier"  # xavier, or identity (zero kernel, I on the centre tap)
    dropout: DropProbability = 0.1  # before the up projection
    num_prefix_tokens: NonNegativeInt = 1  # class (and register) tokens before the patch grid


class Convpass(AdapterModule):
    Config = ConvpassConfig
    wraps = ("module", "linear")
    mergeable = False

    def __init__(self, target: Target, config: ConvpassConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        if target.kind == "mha" and not target.module.batch_first:
            raise ConfigError(
                f"convpass needs (batch, tokens, dim) inputs; {target.name!r} is a sequence-first "
                "nn.MultiheadAttention."
            )
        d_in, d_out, dim = target.in_features, target.out_features, config.dim
        self.scale, self.prefix = config.scale, config.num_prefix_tokens
        self.down = nn.Linear(d_in, dim)  # (dim, D_in)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)  # (dim, dim, 3, 3)
        self.up = nn.Linear(dim, d_out)  # (D_out, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if config.conv_init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(dim)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = dropout(config.dropout)

    @classmethod
    def prepare(
        cls, config: ConvpassConfig, model: nn.Module, targets: list[Target], calibration: Any
    ) -> ConvpassConfig:
        require_patch_grid("convpass", model, "runs a 3x3 convolution over the tokens laid out on the 2-D patch grid")
        return config

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.scale * self.bypass(x)

    def bypass(self, x: Tensor) -> Tensor:
        """``f(x)`` for tokens ``x`` of shape (B, prefix + h * w, D)."""
        b, n, _ = x.shape
        grid = n - self.prefix
        side = math.isqrt(max(grid, 0))
        if grid < 1 or side * side != grid:
            raise ValueError(
                f"convpass expects {self.prefix} prefix token(s) and a square grid of patch tokens, got {n} tokens; "
                "set num_prefix_tokens to the model's (timm: model.num_prefix_tokens)."
            )
        z = quick_gelu(self.down(x))  # (B, P + h*w, dim)
        c = z.shape[-1]
        patches = z[:, self.prefix :].transpose(1, 2).reshape(b, c, side, side)  # (B, dim, h, w)
        patches = self.conv(patches).reshape(b, c, grid).transpose(1, 2)  # (B, dim, h, w) -> (B, h*w, dim)
        # a prefix token as a 1x1 image with padding 1 meets only the centre tap: a linear map plus the bias
        prefix = F.linear(z[:, : self.prefix], self.conv.weight[:, :, 1, 1], self.conv.bias)  # (B, P, dim)
        z = quick_gelu(torch.cat([prefix, patches], dim=1))  # (B, P + h*w, dim)
        return self.up(self.dropout(z))  # (B, P + h*w, D_out)
