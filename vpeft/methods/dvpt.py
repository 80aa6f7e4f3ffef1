"""DVPT: dynamic visual prompt tuning (He, Wang, Wang, Li and Fu, "DVPT: Dynamic Visual Prompt Tuning of Large
Pre-trained Models for Medical Image Analysis", arXiv:2307.09787; Neural Networks 185:107168, 2025), reconstructed
from the paper: the frozen features go through a bottleneck, a few learnable prompts query them by cross-attention,
and the result is projected back and added to the frozen features; the bottleneck is shared between layers.

For block l, with X (B, N, C) the residual stream after the attention sub-block and M prompts P_l (M x c):

    Z   = QuickGELU(X W_d + b_d)                 (N x c)   bottleneck, shared by a group of blocks
    O_l = softmax(P_l Z^T / sqrt(c)) Z           (M x c)   the prompts as queries: M sample-specific prompts
    R_l = softmax(Z O_l^T / sqrt(c)) O_l         (N x c)   every token reads the dynamic prompts back
    X  <- X + mlp(norm2(X)) + g * (R_l W_u + b_u)          W_u: c -> C and the gate g shared like W_d

Aggregation (the abstract only says "aggregated with the frozen features"): option (b) of the spec, the tokens attend
to the dynamic prompts with their own bottleneck features as queries (no extra parameters) and the projected result
is added to every token, in parallel with the MLP like the code's ``share_MLP``. Option (a), writing O_l into
VPT-style prompt slots, adds tokens that every block attends to, so the model could not equal the base model at
initialisation; (b) keeps the sequence, works for classification and dense heads alike, and is the identity at init.

Defaults: c = 20 (``latent``, the ViT code's share_MLP), M = 10 prompts per block (the Swin and SegFormer code, where
the prompt cross-attention is live; trunc-normal std 0.02 as there), one bottleneck per ``share_every = 3``
consecutive adapted blocks (ViT and Swin code), QuickGELU; W_d has PyTorch's Linear init.
Parameters on ViT-B/16 (C = 768, 12 blocks, 4 groups): 4 * (768*20 + 20 + 20*768 + 768 + 1) + 12 * 10 * 20
= 4 * 31,509 + 2,400 = 128,436. In general ceil(L / share_every) * (2 C c + c + C + 1) + L M c, with groups counted
over the adapted blocks. The paper's "0.5%" counts its other tensors too (the code adds VPT prompts and a head).
Not mergeable; the identity at initialisation.

Where this follows the paper against the official code (``NKUhealong/DVPT``):
* The ViT code computes the prompts' cross-attention and never uses its result (``code/model.py``); its only live
  adapter is a plain gated bottleneck. Here the cross-attention of the paper is live, on the bottleneck features.
* The Swin/SegFormer code cross-attends the raw features (no bottleneck) and adds O to the first 10 spatial tokens.
* The code zero-initialises the gate g and keeps W_u at PyTorch's init; here W_u and b_u are zero and g starts at 1
  (also the identity at init; a zero gate *and* a zero W_u would never train).

Placement: targets ``("mlp", "mlp_norm")`` (``mlp_norm`` is the role of ``norm2``, GPT-2's ``ln_2``, Llama's
``post_attention_layernorm``); the parameter-free wrapper on ``norm2`` hands its input (the residual stream)
to the adapter on the ``mlp`` of the same block, as in AdaptFormer. With ``targets=("mlp",)`` the adapter reads the
MLP input ``norm2(X)`` instead. Prefix (class) tokens are ordinary keys and are updated like the patch tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, PositiveInt, Target
from ..errors import ConfigError
from ._blocks import ResidualTaps, block_of, quick_gelu


@dataclass
class DVPTConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp", "mlp_norm")  # the norm taps the residual stream (see the module docstring)
    latent: PositiveInt = 20  # c, the bottleneck width
    num_prompts: PositiveInt = 10  # M, per block
    share_every: PositiveInt = 3  # consecutive adapted blocks sharing one bottleneck (W_d, W_u, g)


class DVPTShared(nn.Module):
    """The shared bottlenecks (one per group of ``share_every`` adapted blocks) and the residual-stream taps."""

    def __init__(self, config: DVPTConfig, targets: list[Target]):
        super().__init__()
        mlps = [t for t in targets if t.kind != "norm"]
        parents = list(dict.fromkeys(block_of(t) for t in mlps))  # adapted blocks, in model order
        self.group = {p: i // config.share_every for i, p in enumerate(parents)}
        widths = {t.out_features for t in mlps}
        if len(widths) != 1:
            raise ConfigError(f"dvpt shares one bottleneck between blocks of one width; the MLPs have widths {widths}.")
        width, c = widths.pop(), config.latent
        self.down = nn.ModuleList(nn.Linear(width, c) for _ in range(max(self.group.values()) + 1))
        self.up = nn.ModuleList(nn.Linear(c, width) for _ in self.down)
        self.gate = nn.Parameter(torch.ones(len(self.down)))  # g per group
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.__dict__["taps"] = ResidualTaps("dvpt", targets)


class DVPT(AdapterModule):
    Config = DVPTConfig
    wraps = ("module", "linear", "norm")
    mergeable = False
    no_weight_decay = ("prompts",)

    def __init__(self, target: Target, config: DVPTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.block = block_of(target)
        self.tap = target.kind == "norm"
        if self.tap:
            return  # a tap holds no tensors: it passes the residual stream on
        if shared.taps.active and target.in_features != target.out_features:
            raise ConfigError(f"dvpt on {target.name!r}: the residual stream must have the width of its output.")
        self.group = shared.group[self.block]
        self.prompts = nn.Parameter(torch.empty(config.num_prompts, config.latent))  # P_l (M, c)
        nn.init.trunc_normal_(self.prompts, std=0.02)

    @classmethod
    def build_shared(cls, config: DVPTConfig, targets: list[Target]) -> nn.Module:
        return DVPTShared(config, targets)

    def dynamic_update(self, x: Tensor) -> Tensor:
        """``g * (R_l W_u + b_u)`` for the stream ``x`` (B, N, C)."""
        sh, k = self.shared, self.group
        z = quick_gelu(sh.down[k](x))  # (B, N, c)
        p = self.prompts.to(z.dtype)
        scale = 1.0 / math.sqrt(z.shape[-1])
        o = torch.softmax(p @ z.transpose(1, 2) * scale, dim=-1) @ z  # (B, M, N) @ (B, N, c) -> (B, M, c)
        r = torch.softmax(z @ o.transpose(1, 2) * scale, dim=-1) @ o  # (B, N, M) @ (B, M, c) -> (B, N, c)
        return sh.gate[k] * F.linear(r, sh.up[k].weight, sh.up[k].bias)  # (B, N, C)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if self.tap:
            self.shared.taps.put(self.block, x)  # (B, N, C), read by the MLP of this block
            return y
        return y + self.dynamic_update(self.shared.taps.take(self.block, x))
