"""VPT: visual prompt tuning, shallow and deep (Jia, Tang, Chen, Cardie, Belongie, Hariharan and Lim, "Visual Prompt
Tuning", ECCV 2022, arXiv:2203.12119), in the paper's "prepend" form (the official KMnP/vpt code).

    shallow: [c_1, Z_1, E_1] = L_1([c_0, P, E_0]),        [c_i, Z_i, E_i] = L_i([c_{i-1}, Z_{i-1}, E_{i-1}])
    deep:    [c_i, _, E_i]   = L_i([c_{i-1}, P_{i-1}, E_{i-1}])   for every block i

``P`` (p tokens of width D, no position embedding) sits after the prefix (class) tokens and before the patch tokens
``E``. The first targeted block inserts it into its input; in deep mode every later block overwrites those p slots
with its own set; the last targeted block strips the p tokens from its output, so what follows (the final norm, the
pooling, the head) sees the original tokens. The official code never strips: its final LayerNorm is per-token and its
head reads the class token only, so stripping gives the same logits; it also keeps prompts out of an average pool.

Init U(-v, v) with v = sqrt(6 / (3 * patch * patch + D)) (the official "xavier" value; 0.0625 on ViT-B/16), where
``patch_size`` is an option (the wrapped blocks cannot see the patch embedding; default 16). Prompt dropout 0.1 on the
prompts at every insertion (the released VTAB launch commands; the config file default is 0). The number of prompts
is tuned per task in the paper (p in {1, 5, 10, 50, 100, 200}) and the per-task table is lost; the defaults here are
the common fixed choices, p = 50 (shallow) and p = 10 (deep). Parameters on ViT-B/16: shallow 768 p (38,400 at
p = 50), deep 12 * 768 p (92,160 at p = 10). Not mergeable (extra tokens), and not the identity at initialisation.

``num_prefix_tokens`` (default 1, the class token) says where the prompts go; set timm's ``model.num_prefix_tokens``
for models with register or distillation tokens. Attention masks passed to the blocks are not extended for the
prompts. Shallow VPT places zero-parameter modules on the middle blocks (they just pass the sequence on).
A model without a patch embedding (a language model, whose attention mask, position ids and KV cache are sized to the
input before its blocks run) is refused before anything changes; ``prompt_tuning`` and ``prefix_tuning`` are the
language-model instances, through the core's model-level call rewrite (vpeft/core/virtual.py).

VPT stays on its per-block wrappers rather than moving onto that rewrite: a ViT's call carries no attention mask,
position ids or cache for the rewrite to extend, so inserting the prompts at the first block is already exact; deep
VPT replaces prompt *tokens* at every block's input (they pass through the block's norm, projections and MLP), which
is neither a prompt prepended once nor a key/value prefix; and the move would change its adapter-file keys
(``blocks.<i>.all.prompts``) for no change in the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, MethodConfig, NonNegativeInt, PositiveInt, Target
from ..errors import ConfigError
from ._blocks import dropout, require_patch_grid


@dataclass
class VPTShallowConfig(MethodConfig):
    targets: tuple[str, ...] = ("block",)
    num_prompts: PositiveInt = 50  # p, tuned per task in the paper
    dropout: DropProbability = 0.1  # on the prompt tokens
    patch_size: PositiveInt = 16  # only sets the init range
    num_prefix_tokens: NonNegativeInt = 1  # prompts go after these (the class token)


@dataclass
class VPTDeepConfig(VPTShallowConfig):
    num_prompts: PositiveInt = 10


def _block_width(target: Target) -> int:
    """The token width of a transformer block: its first LayerNorm's, else its first Linear's input."""
    for m in target.module.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ConfigError(f"vpt cannot tell the token width of {target.name!r} ({type(target.module).__name__}).")


class VPTShallow(AdapterModule):
    no_weight_decay = ("prompts",)  # tokens, like timm's cls_token and pos_embed
    Config = VPTShallowConfig
    wraps = ("module",)
    mergeable = False
    identity_at_init = False
    deep = False

    def __init__(self, target: Target, config: VPTShallowConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.p, self.prefix = config.num_prompts, config.num_prefix_tokens
        self.first, self.last = target.position == 0, target.position == target.count - 1
        self.prompts = None
        if self.first or self.deep:
            width = _block_width(target)
            self.prompts = nn.Parameter(torch.empty(self.p, width))  # (p, D)
            v = math.sqrt(6.0 / (3 * config.patch_size**2 + width))
            nn.init.uniform_(self.prompts, -v, v)
        self.dropout = dropout(config.dropout if self.prompts is not None else 0.0)

    @classmethod
    def prepare(
        cls, config: VPTShallowConfig, model: nn.Module, targets: list[Target], calibration: Any
    ) -> VPTShallowConfig:
        require_patch_grid(
            "vpt",
            model,
            "inserts prompt tokens into the token sequence between blocks; a language model builds its attention "
            "mask, position ids and KV cache for the input's length before its blocks run, so tokens inserted there "
            "break them. Prompts belong beside the patch tokens of an image (a language model's are prompt_tuning and "
            "prefix_tuning)",
        )
        return config

    def adapt_input(self, x: Tensor) -> Tensor:
        if self.prompts is None:
            return x  # shallow, past the first block: the prompts travel with the sequence
        if x.dim() != 3:
            raise ValueError(
                f"vpt prepends tokens to (B, N, D) sequences; this block takes {tuple(x.shape)} (a (B, h, w, C) grid, "
                "as SAM's windowed blocks do), which has no place for prompt tokens. Use lora, adapter or salt here."
            )
        b, k = x.shape[0], self.prefix
        prompts = self.dropout(self.prompts).to(x.dtype).expand(b, -1, -1)  # (p, D) -> (B, p, D)
        rest = x[:, k:] if self.first else x[:, k + self.p :]  # insert, or overwrite the previous block's p slots
        return torch.cat([x[:, :k], prompts, rest], dim=1)  # (B, k + p + N, D)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.last:
            return y
        k = self.prefix
        return torch.cat([y[:, :k], y[:, k + self.p :]], dim=1)  # (B, k + p + N, D) -> (B, k + N, D)


class VPTDeep(VPTShallow):
    Config = VPTDeepConfig
    deep = True
