"""Prompt tuning (Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP
2021, arXiv:2104.08691): ``p`` learned token embeddings ``P`` (``p x D``) are prepended to the embedded input,

    X' = [P; E(x)]          (section 2: "[P_e; X_e] in R^{(p+n) x e}"), the model frozen, P trained

and everything else (the model, its head) is frozen. The model's call is rewritten by the core (vpeft/core/virtual.py):
the attention mask, position ids, token type ids and token-level labels are extended by ``p``, ``generate()`` keeps
the prompts in its key/value cache, and the outputs lose the ``p`` prompt positions again, so a task sees one output
per input token. ``P`` sits on the input token embedding (role ``embed``), where the adapter files and the parameter
report find it: ``p * D`` parameters (all-MiniLM-L6-v2, p = 20: 20 * 384 = 7,680, HF PEFT's count).

Initialisation (``init``), the paper's three (section 3.3) as HF PEFT offers them:

* ``random``: U(-0.5, 0.5), the paper's "random uniform" (HF PEFT's RANDOM is nn.Embedding's N(0, 1), far above the
  scale of a trained embedding table);
* ``sample_vocab`` (default): the embeddings of ``p`` token ids drawn uniformly from the whole vocabulary, as HF PEFT
  does (the paper draws from the 5,000 most common tokens, which a vocabulary alone does not say);
* ``text``: the embeddings of ``init_token_ids``, cut or repeated to ``p`` tokens as HF PEFT does with its
  ``prompt_tuning_init_text``. The ids are given already tokenised (the paper's "class label" init is the labels'
  ids), so that a saved adapter rebuilds from its config without a tokenizer.

``num_virtual_tokens`` defaults to 20, the count the paper finds enough at large scale (100 is its setting for the
smaller T5s). Departures from HF PEFT, besides the outputs without prompt positions: passed ``position_ids`` are
extended (prompts at ``0..p-1``, the input after them) rather than dropped, so a left-padded batch keeps the positions
``generate()`` derives from its mask; the prompts take the dtype of the embedding table (PEFT keeps float32).
Not mergeable (the prompts are tokens, not a weight change); not the identity at initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, NonNegativeInt, PositiveInt, Target
from ..errors import OptionError


@dataclass
class PromptTuningConfig(MethodConfig):
    targets: tuple[str, ...] = ("embed",)
    num_virtual_tokens: PositiveInt = 20  # p
    init: Literal["random", "sample_vocab", "text"] = "sample_vocab"
    init_token_ids: tuple[NonNegativeInt, ...] = ()  # init="text": token ids of the initial text

    def check(self) -> None:
        if (self.init == "text") != bool(self.init_token_ids):
            raise OptionError(
                "prompt_tuning option init_token_ids goes with init='text' and only with it: the token ids of the "
                f"text whose embeddings start the prompts; got init={self.init!r}, "
                f"init_token_ids={list(self.init_token_ids)}.",
                "init_token_ids",
            )


def initial_embeddings(embedding: nn.Module, config: PromptTuningConfig, count: int) -> Tensor:
    """``(count, D)`` starting values: uniform, sampled vocabulary rows, or the rows of the given ids."""
    weight = embedding.weight  # (vocab, D)
    if config.init == "random":
        return torch.empty(count, weight.shape[1], dtype=weight.dtype, device=weight.device).uniform_(-0.5, 0.5)
    if config.init == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (count,), device=weight.device)
    else:
        if max(config.init_token_ids) >= weight.shape[0]:
            raise OptionError(
                f"prompt_tuning option init_token_ids holds id {max(config.init_token_ids)}, and the embedding table "
                f"has {weight.shape[0]} rows; give ids of this model's tokenizer.",
                "init_token_ids",
            )
        repeated = list(config.init_token_ids) * math.ceil(count / len(config.init_token_ids))
        ids = torch.tensor(repeated[:count], device=weight.device)
    return weight.detach()[ids].clone()


class PromptTuning(AdapterModule):
    Config = PromptTuningConfig
    wraps = ("module",)
    mergeable = False
    identity_at_init = False
    virtual = "embeddings"
    no_weight_decay = ("prompts",)  # tokens, like VPT's prompts and timm's cls_token

    def __init__(self, target: Target, config: PromptTuningConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.prompts = nn.Parameter(initial_embeddings(target.module, config, config.num_virtual_tokens))  # (p, D)

    @classmethod
    def accepts(cls, target: Target, config: PromptTuningConfig) -> bool:
        """a token embedding table (nn.Embedding), the model's input embedding"""
        return isinstance(target.module, nn.Embedding)

    def virtual_embeddings(self, batch: int) -> Tensor:
        return self.prompts.unsqueeze(0).expand(batch, -1, -1)  # (B, p, D)
