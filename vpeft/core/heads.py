"""Attention heads as rows and columns of a model's weights: which output rows of the q, k and v projections and which
input columns of the attention's output projection belong to a head.

Multi-head attention computes head ``h`` from rows ``h * d .. (h + 1) * d`` of the query, key and value projections
(``d`` the head width) and writes it into columns ``h * d .. (h + 1) * d`` of the output projection's input. With
grouped-query attention (Llama 3, SmolLM2: 9 query heads share 3 key/value heads) the key and value projections have
``num_kv_heads`` heads, and query head ``h`` reads key/value head ``h // (num_heads / num_kv_heads)``. The same
holds for a fused projection (GPT-2's ``c_attn``, timm's ``qkv``): the core slices it into q, k and v first
(:func:`~vpeft.core.modules.fused_parts`), and the rows here are rows of a slice. Rows and columns are of a weight in
``(out, in)`` layout (:func:`~vpeft.core.modules.weight_and_bias`, which transposes HF ``Conv1D``), so they do not
depend on how a library stores it.

:func:`head_layout` reads a model's layout: from the attention module around a projection (timm ``Attention``, HF
GPT-2 and nn.MultiheadAttention state ``num_heads``; HF BERT ``num_attention_heads``), else from the nearest HF
``config`` (Llama's attention module holds one; so does every HF model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .targets import walk

OUT = "out"  # the part name of the attention's output projection, whose input columns are the heads


@dataclass(frozen=True)
class HeadLayout:
    """How one attention splits its projections into heads."""

    num_heads: int  # query heads; the output projection reads num_heads * head_dim inputs
    num_kv_heads: int  # key/value heads: fewer than num_heads with grouped-query attention
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads, self.head_dim) < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"not a head layout: {self} (num_kv_heads must divide num_heads)")

    def width(self, part: str) -> int:
        """Rows of projection ``part`` (``q``, ``k``, ``v``), or input columns of the output projection (``out``)."""
        return (self.num_kv_heads if part in ("k", "v") else self.num_heads) * self.head_dim

    def heads_of(self, part: str, heads: Iterable[int]) -> list[int]:
        """The heads of projection ``part`` that query heads ``heads`` use, sorted: themselves for ``q`` and ``out``,
        their key/value heads for ``k`` and ``v`` (one per group, however many of its query heads are named)."""
        heads = list(heads)
        bad = [h for h in heads if not 0 <= h < self.num_heads]
        if bad:
            raise ValueError(f"head {bad[0]} does not exist: the attention has heads 0 to {self.num_heads - 1}")
        if part in ("k", "v"):
            group = self.num_heads // self.num_kv_heads
            return sorted({h // group for h in heads})
        return sorted(set(heads))

    def indices(self, part: str, heads: Iterable[int]) -> Tensor:
        """The rows of ``part`` (``q``, ``k``, ``v``), or columns of the output projection (``out``), that belong to
        query heads ``heads``, ascending, as a long tensor for ``index_select``/``index_add``."""
        own = torch.tensor(self.heads_of(part, heads), dtype=torch.long)
        return (own[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()


def head_layout(model: nn.Module, path: str) -> HeadLayout | None:
    """The head layout of the attention that the projection at logical ``path`` belongs to, read from the nearest
    enclosing module that states one; None when none does."""
    modules = dict(walk(model))
    pieces = path.split(".")
    for depth in range(len(pieces) - 1, -1, -1):
        module = modules.get(".".join(pieces[:depth])) if depth else model
        layout = _stated(module) if module is not None else None
        if layout is not None:
            return layout
    return None


def _stated(module: nn.Module) -> HeadLayout | None:
    heads = _int(module, "num_heads", "num_attention_heads")
    if heads is not None:  # an attention module (timm, GPT-2, BERT's self-attention, nn.MultiheadAttention)
        head_dim = _int(module, "head_dim", "attention_head_size")
        width = _int(module, "embed_dim", "all_head_size")
        if head_dim is None and width is not None:
            head_dim = width // heads
        kv = _int(module, "num_key_value_heads", "num_kv_heads")
        groups = _int(module, "num_key_value_groups")
        if kv is None:
            kv = heads // groups if groups else heads
        return HeadLayout(heads, kv, head_dim) if head_dim else None
    config = getattr(module, "config", None)
    heads = _int(config, "num_attention_heads") if config is not None else None
    if heads is None:
        return None
    kv = _int(config, "num_key_value_heads") or heads
    head_dim = _int(config, "head_dim") or (_int(config, "hidden_size") or 0) // heads
    return HeadLayout(heads, kv, head_dim) if head_dim else None


def _int(obj: object, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
