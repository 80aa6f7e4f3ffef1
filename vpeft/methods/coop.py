"""CoOp: context optimisation, learned prompt context for a CLIP text tower (Zhou, Yang, Loy and Liu, "Learning to
Prompt for Vision-Language Models", IJCV 2022, arXiv:2109.01134).

The prompt of class i is ``t_i = [V]_1 [V]_2 ... [V]_M [CLASS_i]`` (their Eq. 2 context): M context vectors of the
text tower's token width, shared by every class ("unified context"), in place of the word embeddings of the prompt's
first M words, with the class name after them. The classifier is CLIP's (Eq. 1, :mod:`vpeft.tasks.clip`):
``p(y = i | x) = exp(cos(g(t_i), f(x)) / tau) / sum_j exp(cos(g(t_j), f(x)) / tau)``, with both towers frozen; only
the M x D context trains (M = 16: 8,192 parameters for CLIP ViT-B/16's 512-wide text tower).

Defaults are the paper's main setting: M = 16, class token at the end, unified context, random init N(0, 0.02^2)
(the official code's ``nn.init.normal_(std=0.02)``); the paper trains with SGD, lr 0.002, cosine schedule, batch 32,
200 epochs for 8/16 shots, 100 for 2/4, 50 for 1 (``configs/clip/real/``; the offline proof uses AdamW).

How it sits in vpeft: the method wraps the text tower's ``token_embedding`` and overwrites positions 1..M of its
output (position 0 is the start token) with the context, as the official code concatenates ``[SOS][ctx][class.]``.
The task writes the prompts as CoOp's code does, ``"X X ... X {class}."`` with M placeholder words (the
``model.head.templates`` of ``configs/clip/coop.yaml``), so the positions, the end-of-text token that CLIP pools
and the causal mask are exactly those of the paper's prompt; a prompt whose first M words are not one repeated
placeholder is refused. Departures: the class-specific context (CSC) and the middle class position, the paper's
ablations, are not implemented. Not mergeable (the context is not a weight), and not the identity at init (the
context replaces the placeholder words).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, PositiveFloat, PositiveInt, Target
from ..errors import ConfigError


@dataclass
class CoOpConfig(MethodConfig):
    targets: tuple[str, ...] = ("token_embedding",)  # the text tower's word embedding (open_clip's name)
    head: tuple[str, ...] | None = ()  # CLIP's classifier is made from text: no head to copy
    n_ctx: PositiveInt = 16  # M
    init_std: PositiveFloat = 0.02


class CoOp(AdapterModule):
    Config = CoOpConfig
    wraps = ("module",)
    identity_at_init = False
    no_weight_decay = ("ctx",)

    def __init__(self, target: Target, config: CoOpConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        embedding = target.module
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"coop adapts a text tower's token embedding (nn.Embedding); {target.name!r} is "
                f"{type(embedding).__name__}."
            )
        self.n_ctx = config.n_ctx
        weight = embedding.weight
        self.ctx = nn.Parameter(torch.empty(config.n_ctx, weight.shape[1], dtype=weight.dtype, device=weight.device))
        nn.init.normal_(self.ctx, std=config.init_std)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        """``x``: (B, L) token ids; ``y``: their (B, L, D) embeddings, positions 1..M replaced by the context."""
        m = self.n_ctx
        words = x[:, 1 : m + 1]
        if x.shape[1] < m + 2 or bool((words != words[:, :1]).any()) or bool((x.argmax(dim=-1) <= m).any()):
            raise ConfigError(
                f"coop replaces the first {m} words of each prompt with its context, so every prompt must begin with "
                f"{m} copies of one placeholder word and then the class name, as CoOp's 'X X ... X {{}}.' "
                f"({m} X's); set model.head.templates to that (or n_ctx to the number of placeholders)."
            )
        ctx = self.ctx.to(y.dtype).expand(y.shape[0], -1, -1)
        return torch.cat([y[:, :1], ctx, y[:, m + 1 :]], dim=1)
