"""Prefix tuning (Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021,
arXiv:2101.00190): every attention layer attends to ``p`` learned keys and values before the input's,

    h_i = P_theta[i, :]                       for i in P_idx (the prefix positions), eq. (3-4)
    attention(Q, [K_P; K], [V_P; V])          per layer, the model frozen

with an optional reparameterisation (section 4.3, eq. 5): ``P_theta[i, :] = MLP_theta(P'_theta[i, :])``, a smaller
matrix ``P'`` through a two-layer MLP, which the paper finds stabilises training; after training only ``P_theta`` is
needed. The keys and values enter through the model's key/value cache: the core (vpeft/core/virtual.py) fills a
``DynamicCache`` with them before the input, extends the attention mask by ``p`` and lets ``generate()`` carry them;
the input tokens take positions ``p..p+L-1`` and rotary embeddings are not applied to the prefix (it is a cache entry,
as in HF PEFT). The tensors sit on the input token embedding (role ``embed``), where the adapter files and the
parameter report find them.

Layout and defaults are HF PEFT's ``PrefixTuningConfig`` (0.21): one matrix of ``p x (layers * 2 * width)``, read as
``(p, 2 * layers, kv_heads, head_dim)`` with layer ``i``'s keys at ``2i`` and values at ``2i + 1``, where ``width =
kv_heads * head_dim`` (grouped-query models get prefixes for their key/value heads), initialised N(0, 1)
(nn.Embedding's init, PEFT's); ``projection`` (PEFT's ``prefix_projection``) trains ``P'`` (``p x width``, N(0, 1))
and ``Linear(width, projection_width) -> tanh -> Linear(projection_width, layers * 2 * width)`` (PyTorch's Linear
init), with ``projection_width`` defaulting to ``width`` (PEFT's ``encoder_hidden_size``; the paper uses 512 for
table-to-text and 800 for summarisation). Parameters without projection: ``p * layers * 2 * width``
(all-MiniLM-L6-v2, p = 20: 20 * 6 * 2 * 384 = 92,160, HF PEFT's count). ``num_virtual_tokens`` defaults to 20 (the
paper tunes it: 10 for table-to-text, 200 for summarisation).

``num_layers``, ``kv_heads`` and ``head_dim`` are read from the model's config (``num_hidden_layers``,
``num_key_value_heads`` or ``num_attention_heads``, ``head_dim`` or hidden size over heads) when the adapter is added
and kept in its config, so a saved adapter rebuilds from its config alone. Not mergeable; not the identity at
initialisation. Departures from HF PEFT: none in the math; PEFT's ``init_weights="zero"`` is not offered (a zero
prefix is not the identity either: the zero keys still take attention mass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, PositiveInt, Target, call_site
from ..errors import ConfigError


@dataclass
class PrefixTuningConfig(MethodConfig):
    targets: tuple[str, ...] = ("embed",)
    num_virtual_tokens: PositiveInt = 20  # p
    projection: bool = False  # the reparameterisation MLP (PEFT's prefix_projection)
    projection_width: PositiveInt | None = None  # its hidden width; None: the key/value width
    num_layers: PositiveInt | None = None  # read from the model when None
    kv_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head width) of a transformers model config, or None where it does not say."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    return layers, kv_heads, head_dim


class PrefixTuning(AdapterModule):
    Config = PrefixTuningConfig
    wraps = ("module",)
    mergeable = False
    identity_at_init = False
    virtual = "cache"
    no_weight_decay = ("prefix", "tokens")  # tokens; the MLP's weights decay

    def __init__(self, target: Target, config: PrefixTuningConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        p = self.num_virtual_tokens = config.num_virtual_tokens
        self.layers, self.kv_heads, self.head_dim = config.num_layers, config.kv_heads, config.head_dim
        width = self.kv_heads * self.head_dim
        out = self.layers * 2 * width
        self.projection = config.projection
        if config.projection:
            hidden = config.projection_width or width
            self.tokens = nn.Parameter(torch.randn(p, width))  # P'
            self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.prefix = nn.Parameter(torch.randn(p, out))  # P_theta

    @classmethod
    def accepts(cls, target: Target, config: PrefixTuningConfig) -> bool:
        """a token embedding table (nn.Embedding), the model's input embedding"""
        return isinstance(target.module, nn.Embedding)

    @classmethod
    def prepare(
        cls, config: PrefixTuningConfig, model: nn.Module, targets: list[Target], calibration: Any
    ) -> PrefixTuningConfig:
        if None not in (config.num_layers, config.kv_heads, config.head_dim):
            return config
        site = call_site(model)
        read = attention_shape(site.config) if site is not None else (None, None, None)
        given = (config.num_layers, config.kv_heads, config.head_dim)
        names = ("num_layers", "kv_heads", "head_dim")
        values = {n: g if g is not None else r for n, g, r in zip(names, given, read, strict=True)}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            where = f"{type(site).__name__}'s config" if site is not None else f"{type(model).__name__} (no config)"
            raise ConfigError(
                f"prefix_tuning sizes its keys and values by the model's attention, and {where} does not say "
                f"{', '.join(missing)} (num_hidden_layers, num_key_value_heads or num_attention_heads, head_dim or "
                "hidden_size): pass them as options of the same names."
            )
        return dataclasses.replace(config, **values)

    def flat_prefix(self) -> Tensor:
        """``P_theta``: ``(p, layers * 2 * kv_heads * head_dim)``, through the MLP when reparameterised."""
        return self.transform(self.tokens) if self.projection else self.prefix

    def virtual_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        p = self.num_virtual_tokens
        kv = self.flat_prefix().view(p, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2 * layers, B, kv_heads, p, head_dim)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]
