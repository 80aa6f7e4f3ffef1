"""Physical pruning of a transformer's attention heads and FFN neurons (Light-PEFT's structured pruning), per
architecture family: not a registered method.

A block's heads are rows of its q, k and v projections and input columns of its attention output projection
(:class:`vpeft.core.HeadLayout`); its FFN neurons are rows of the projection(s) into the FFN and input columns of the
projection out of it. Removing them leaves every other output of the block as it was, so the pruned model computes
what the unpruned one computes with those heads' attention probabilities and those neurons' activations set to 0.

Supported families, found by module names (what the modules compute is the same in each, the names differ):

* HF BERT-style encoders: ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense`` (in), ``output.dense`` (out); the attention reshapes with ``-1`` heads, and its
  ``num_attention_heads`` and ``all_head_size`` are updated.
* HF Llama-style decoders: ``self_attn.{q,k,v,o}_proj``, ``mlp.gate_proj`` and ``mlp.up_proj`` (in),
  ``mlp.down_proj`` (out). With grouped-query attention, query head ``h`` reads key/value head ``h // g``
  (``num_key_value_groups = g``); the kept query heads must fill their key/value groups equally (``c`` each, then
  ``num_key_value_groups = c``), and a key/value head is removed only with all the query heads of its group.

Others (GPT-2's fused ``c_attn``, timm's fused ``qkv``) are refused with that reason. The structure a model was pruned
to is recorded on the model (``model.__dict__[STRUCTURE]``), so that pruning it again to the same structure (an
adapter rebuilt on the live model) is a no-op, and pruning it to another is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import HeadLayout, head_layout, walk
from ..errors import ConfigError

STRUCTURE = "_vpeft_pruned_structure"


@dataclass(frozen=True)
class Block:
    """The prunable modules of one transformer block, as logical paths (wrappers seen through)."""

    attention: str  # the module that holds the head attributes (BERT's self-attention, Llama's self_attn)
    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # their output rows are the FFN neurons
    ffn_out: str  # its input columns are the FFN neurons


def find_blocks(model: nn.Module, method: str = "light_peft") -> list[Block]:
    """The model's blocks in model order; a :class:`ConfigError` naming the reason when its family is unsupported."""
    modules = dict(walk(model))
    found = []
    for path, module in modules.items():
        children = set(module._modules)
        if {"query", "key", "value"} <= children and path.endswith(".self"):
            attention = path[: -len(".self")]
            block = attention.rsplit(".", 1)[0]
            names = [f"{path}.query", f"{path}.key", f"{path}.value", f"{attention}.output.dense"]
            ffn_in, ffn_out = (f"{block}.intermediate.dense",), f"{block}.output.dense"
            found.append(Block(path, *names, ffn_in, ffn_out))
        elif {"q_proj", "k_proj", "v_proj", "o_proj"} <= children:
            block = path.rsplit(".", 1)[0]
            names = [f"{path}.{p}_proj" for p in "qkvo"]
            ffn_in = tuple(p for p in (f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj") if p in modules)
            found.append(Block(path, *names, ffn_in, f"{block}.mlp.down_proj"))
    bad = [b for b in found if not all(type(modules.get(p)) is nn.Linear for p in (b.q, b.k, b.v, b.o, *b.ffn_in,
                                                                                     b.ffn_out))]  # fmt: skip
    if not found or bad or any(not b.ffn_in for b in found):
        raise ConfigError(
            f"{method} prunes attention heads and FFN neurons physically, which it does for HF BERT-style encoders "
            "(attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense) and HF "
            f"Llama-style decoders (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj as nn.Linear); "
            f"{type(model).__name__} has no such blocks (a fused qkv projection, as GPT-2's c_attn or timm's qkv, is "
            "not split by this pruning). Use lora, or a controller that prunes adapters only (diffora)."
        )
    return found


def layouts(model: nn.Module, blocks: Sequence[Block]) -> list[HeadLayout]:
    """Each block's head layout, as the unpruned model states it."""
    return [head_layout(model, b.q) for b in blocks]


def kept_rows(layout: HeadLayout, part: str, heads: Sequence[int]) -> Tensor:
    """The rows of projection ``part`` (q, k, v; ``out``: input columns of the output projection) that query heads
    ``heads`` keep."""
    return layout.indices(part, heads)


def check_heads(layout: HeadLayout, heads: Sequence[int]) -> int:
    """Query heads per key/value group after pruning to ``heads`` (sorted); a ValueError when they do not fill their
    groups equally (grouped-query attention) or are none."""
    group = layout.num_heads // layout.num_kv_heads
    counts = {}
    for h in heads:
        counts[h // group] = counts.get(h // group, 0) + 1
    if not counts or len(set(counts.values())) != 1 or list(heads) != sorted(set(heads)):
        raise ValueError(f"kept heads {list(heads)} must be sorted, at least one, and fill their key/value groups "
                         f"(of {group} query heads) equally")  # fmt: skip
    return next(iter(counts.values()))


def prune(model: nn.Module, blocks: Sequence[Block], heads: Sequence[Sequence[int]], neurons: Sequence[Tensor]) -> None:
    """Prune ``model`` (unpruned, or already pruned to exactly this structure: then nothing happens) to keep query
    heads ``heads[i]`` and FFN neurons ``neurons[i]`` (a long index, ascending) of block ``i``."""
    structure = (tuple(tuple(h) for h in heads), tuple(tuple(n.tolist()) for n in neurons))
    done = model.__dict__.get(STRUCTURE)
    if done is not None:
        if done != structure:
            raise ValueError("this model was already pruned to another structure; prune a fresh copy of the model.")
        return
    modules = dict(walk(model))
    plans = []
    for block, layout, kept, neuron in zip(blocks, layouts(model, blocks), heads, neurons, strict=True):
        per_group = check_heads(layout, kept)
        plans.append((block, layout, list(kept), per_group, neuron))
    for block, layout, kept, per_group, neuron in plans:
        if len(kept) < layout.num_heads:
            for part in ("q", "k", "v"):
                _prune_linear(modules[getattr(block, part)], 0, kept_rows(layout, part, kept))
            _prune_linear(modules[block.o], 1, kept_rows(layout, "out", kept))
            _set_heads(modules[block.attention], layout, len(kept), per_group)
        if neuron.numel() < modules[block.ffn_out].in_features:
            for path in block.ffn_in:
                _prune_linear(modules[path], 0, neuron)
            _prune_linear(modules[block.ffn_out], 1, neuron)
    model.__dict__[STRUCTURE] = structure


def _prune_linear(layer: nn.Linear, dim: int, index: Tensor) -> None:
    """Keep rows (``dim`` 0: outputs, and their bias) or columns (``dim`` 1: inputs) ``index`` of a frozen Linear."""
    with torch.no_grad():
        index = index.to(layer.weight.device)
        layer.weight = nn.Parameter(layer.weight.index_select(dim, index).clone(), layer.weight.requires_grad)
        if dim == 0 and layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, index).clone(), layer.bias.requires_grad)
    if dim == 0:
        layer.out_features = index.numel()
    else:
        layer.in_features = index.numel()


def _set_heads(attention: nn.Module, layout: HeadLayout, heads: int, per_group: int) -> None:
    """The head counts an attention module keeps as attributes, after pruning to ``heads`` query heads."""
    grouped = layout.num_kv_heads < layout.num_heads
    kv = heads // per_group if grouped else heads
    values = {"num_attention_heads": heads, "num_heads": heads, "all_head_size": heads * layout.head_dim,
              "num_key_value_heads": kv, "num_key_value_groups": per_group if grouped else 1}  # fmt: skip
    for name, value in values.items():
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)
