"""S2FT: structured sparse fine-tuning (Yang, Leng, Guo, Zhao, Nakada, Zhang, Yao and Chen, "S2FT: Efficient, Scalable
and Generalizable LLM Fine-tuning by Structured Sparsity", NeurIPS 2024, arXiv:2412.06289).

A few whole structures of the model are trained densely: attention heads and FFN channels. A structure is coupled
across the weights that compute and consume it: head ``h`` is rows ``h d .. (h + 1) d`` of the q, k and v projections
(with grouped-query attention, the rows of the key/value head its query group reads) and the same columns of the
output projection's input; FFN channel ``c`` is row ``c`` of the up (and gate) projection and column ``c`` of the
down projection. For a target with weight ``W0`` and the selected rows ``R`` (q, k, v, up, gate) or columns ``C``
(output, down), the trained slice ``S`` starts at zero and

    y = W0 x + P_R (S x),       S in R^{|R| x d_in}     (rows: the output at R gets S x)
    y = W0 x + S x[C],          S in R^{d_out x |C|}    (columns: only the selected inputs are read)

i.e. ``W = W0 + S`` on the slice and ``W0`` elsewhere, which merges exactly (``W[R] += S``, ``W[:, C] += S``).

Partial back-propagation (section 3.3). Only ``S`` requires a gradient, so autograd computes the weight gradient of the
slice alone, ``dL/dS = (dL/dy)[..., R]^T x`` or ``(dL/dy)^T x[..., C]``, which is the slice of the full weight
gradient; the frozen remainder gets none, and the frozen base matmul keeps no activation for one. A column target
keeps only ``x[..., C]`` (a gathered copy) for its backward, not its whole input: on the down projection, whose input
is the FFN's widest activation, that is the memory saving the paper measures. A row target needs its whole input,
as LoRA does.

Selection (the paper's default, random): ``head_ratio`` of all heads and ``channel_ratio`` of all FFN channels over
the adapted blocks are drawn without replacement, by ``random.Random(seed)``, heads first: the official
``finetune.py`` draws ``int(ratio * num_layers * units)`` indices over all layers with ``random.sample`` the same way
(so some blocks get none, others several). The draw is stored in the config (``heads`` and ``channels``: ``(block,
unit)`` pairs; ``layout``: the model's ``(num_heads, num_kv_heads, head_dim)``), so a saved adapter reloads the same
structures; passing ``heads``/``channels`` chooses them by hand. Targets in blocks without a selected unit of their
kind are not adapted.

Defaults, from the official LLaMA-2 scripts (``finetune_{commonsense,math}_llama2_s2.sh``: ``--o_ratio 0.052
--d_ratio 0.02``, v/u ratios 0): the output projection (``attn_out``) with 5.2% of the heads and the down projection
(``mlp_out``) with 2% of the channels, seed 0. That is the paper's ~0.8% of LLaMA-7B's weights; its LLaMA-3 scripts
train the down projection alone at 3% (``targets=("mlp_out",), channel_ratio=0.03``). Any of q, k, v (or slices of a
fused qkv), ``mlp_in`` and ``gate_proj`` can be added to ``targets``; they train the rows of the same heads and
channels. SmolLM2-135M at the defaults: 14 of 270 heads (14 * 64 * 576 = 516,096) and 921 of 46,080 channels
(921 * 576 = 530,496): 1,046,592 parameters. A training step's peak memory on SmolLM2 (CPU, batch 1 x 256
tokens): 1721 MB at the defaults and 1717 MB at LoRA's count (800 down-projection channels, 460,800 parameters),
against 1764 MB for LoRA r=8 on q and v (``V-PEFT-Bench/perf/results/cpu-smollm2-memory-sparse.md``).

Departures from the official code, none of which changes the function trained. (1) No co-permutation: the official
code permutes the heads and channels of the coupled weights so that each slice is contiguous (``s2_utils.py``) and
trains ``weight[start:end]``; here ``index_select``/``index_add`` address the selected rows and columns in place, so the
base weights are never rewritten (disable, unmerge and other adapters see the original model). (2) One draw of heads
and one of channels per adapter, shared by all of a block's targets of that kind (a head is trained in every targeted
projection that computes or reads it); the official code draws the v and o heads (u and d channels) independently.
(3) At least one unit is drawn where ``int(ratio * total)`` is 0 (tiny models), where the official code trains none.
(4) Its efficiency variant (``efficiency/s2ft.py``) updates the base weight's slice in place through a custom
optimizer; the trained slice here is a separate zero-initialised tensor, as in its experiments (``s2ft/s2.py``).
Wraps Linear (and HF Conv1D) and q/k/v slices of fused projections; the head layout is read by
:func:`vpeft.core.head_layout`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (
    ROLES,
    WHOLE,
    AdapterModule,
    HeadLayout,
    MethodConfig,
    NonNegativeInt,
    PositiveInt,
    ProperFraction,
    Target,
    head_layout,
    name_matches,
)
from ..errors import ConfigError, OptionError

HEADS, CHANNELS = "heads", "channels"
# role -> (unit, side, part of the head layout); gate_proj has no role of its own: it reads the FFN input as up does
_STRUCTURE = {
    "q": (HEADS, "rows", "q"),
    "k": (HEADS, "rows", "k"),
    "v": (HEADS, "rows", "v"),
    "attn_out": (HEADS, "columns", "out"),
    "mlp_in": (CHANNELS, "rows", None),
    "gate": (CHANNELS, "rows", None),
    "mlp_out": (CHANNELS, "columns", None),
}
_GATE = ("mlp.gate_proj",)


@dataclass
class S2FTConfig(MethodConfig):
    targets: tuple[str, ...] = ("attn_out", "mlp_out")
    head_ratio: ProperFraction = 0.052  # share of the heads of all adapted blocks that is trained
    channel_ratio: ProperFraction = 0.02  # share of the FFN channels of all adapted blocks that is trained
    seed: NonNegativeInt = 0  # of the random draw of heads and channels
    heads: tuple[tuple[int, NonNegativeInt], ...] | None = None  # (block, head) trained; None: drawn when applied
    channels: tuple[tuple[int, NonNegativeInt], ...] | None = None  # (block, channel) trained; None: drawn
    layout: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None  # (heads, kv heads, head dim); None: read


def structure(target: Target) -> tuple[str, str, str | None] | None:
    """``(unit, side, part)`` of a target: heads or channels, rows or columns, and the head-layout part (q, k, v,
    out); None for a module that is neither an attention projection nor an FFN linear."""
    if target.part in ("q", "k", "v"):
        return _STRUCTURE[target.part]
    if target.part != WHOLE:
        return None
    for role, patterns in [*((r, ROLES[r]) for r in ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")), ("gate", _GATE)]:
        if any(name_matches(target.name, p) for p in patterns if "[" not in p):
            return _STRUCTURE[role]
    return None


def block_of(target: Target) -> int:
    return target.index if target.index is not None else -1


def unit_count(target: Target, unit: str, side: str, layout: HeadLayout | None) -> int:
    """Heads of the attention, or channels of the FFN, that a target belongs to."""
    if unit == HEADS:
        return layout.num_heads
    return target.out_features if side == "rows" else target.in_features


class S2FT(AdapterModule):
    Config = S2FTConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: S2FTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        unit, side, part = structure(target)
        block = block_of(target)
        chosen = [u for b, u in (config.heads if unit == HEADS else config.channels) or () if b == block]
        if unit == HEADS:
            index = HeadLayout(*config.layout).indices(part, chosen)
        else:
            index = torch.tensor(sorted(chosen), dtype=torch.long)
        self.rows = side == "rows"
        self.shape = (target.out_features, target.in_features)
        # rebuilt from the config, which records the selection: not saved with the tensors
        self.register_buffer("index", index, persistent=False)
        size = (len(index), self.shape[1]) if self.rows else (self.shape[0], len(index))
        self.s2 = nn.Parameter(torch.zeros(size))  # the trained slice: zeros, so the model starts as the base

    @classmethod
    def accepts(cls, target: Target, config: S2FTConfig) -> bool:
        """attention projections and FFN linears in blocks where a head (attention) or channel (FFN) is selected."""
        found = structure(target)
        chosen = None if found is None else config.heads if found[0] == HEADS else config.channels
        return chosen is None or any(b == block_of(target) for b, _ in chosen)

    @classmethod
    def prepare(cls, config: S2FTConfig, model: nn.Module, targets: list[Target], calibration: Any) -> S2FTConfig:
        kinds = {t.key: structure(t) for t in targets}
        odd = [key for key, found in kinds.items() if found is None]
        if odd:
            raise ConfigError(
                f"s2ft trains whole attention heads and FFN channels, but target {odd[0]!r} is neither an attention "
                "projection (roles q, k, v, attn_out) nor an FFN linear (roles mlp_in, mlp_out, or gate_proj); drop "
                "it from targets."
            )
        layout = _layout(config, model, [t for t in targets if kinds[t.key][0] == HEADS])
        units: dict[str, dict[int, int]] = {HEADS: {}, CHANNELS: {}}  # unit -> block -> count
        for t in targets:
            unit, side, _ = kinds[t.key]
            count, seen = unit_count(t, unit, side, layout), units[unit].setdefault(block_of(t), None)
            if seen is not None and seen != count:
                raise ConfigError(
                    f"s2ft: the FFN targets of block {block_of(t)} disagree on its channels ({seen} and {count} at "
                    f"{t.key!r}): up, gate and down of one FFN must share its hidden width."
                )
            units[unit][block_of(t)] = count
        rng = random.Random(config.seed)
        heads = _selection(config, "heads", units[HEADS], config.head_ratio, rng)  # heads first, as the official
        channels = _selection(config, "channels", units[CHANNELS], config.channel_ratio, rng)
        return dataclasses.replace(
            config, heads=heads, channels=channels, layout=layout and dataclasses.astuple(layout)
        )

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if self.rows:  # the selected output rows get S x; the others are y as it is
            return y.index_add(-1, self.index, F.linear(x, self.s2))
        return y + F.linear(x.index_select(-1, self.index), self.s2)  # a copy of x[..., C]: all the backward keeps

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight.index_add(0 if self.rows else 1, self.index, self.s2.to(weight.dtype)), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight.index_add(0 if self.rows else 1, self.index, self.s2.to(weight.dtype), alpha=-1), bias

    def delta_weight(self) -> Tensor:
        return self.s2.new_zeros(self.shape).index_add(0 if self.rows else 1, self.index, self.s2)


def _layout(config: S2FTConfig, model: nn.Module, targets: list[Target]) -> HeadLayout | None:
    """The head layout of the attention targets, read from the model (or checked against the ``layout`` option)."""
    if not targets:
        return None
    read = {head_layout(model, t.name) for t in targets}
    if None in read:
        where = next(t.key for t in targets if head_layout(model, t.name) is None)
        raise ConfigError(
            f"s2ft cannot tell the attention heads of {where!r}: no module around it states num_heads (or "
            "num_attention_heads) and no Hugging Face config does. Pass layout=(num_heads, num_kv_heads, head_dim)."
        )
    if config.layout is not None:
        try:
            read = {HeadLayout(*config.layout)}
        except ValueError:
            raise OptionError(
                f"s2ft option layout={config.layout} is not (num_heads, num_kv_heads, head_dim) of an attention: "
                "num_kv_heads must divide num_heads.",
                "layout",
            ) from None
    if len(read) > 1:
        raise ConfigError(f"s2ft: the attention targets have different head layouts ({sorted(map(str, read))}).")
    layout = read.pop()
    for t in targets:
        _, side, part = structure(t)
        width = t.out_features if side == "rows" else t.in_features
        if width != layout.width(part):
            raise OptionError(
                f"s2ft: target {t.key!r} is {width} wide where its head layout ({layout.num_heads} heads, "
                f"{layout.num_kv_heads} key/value heads of {layout.head_dim}) gives {layout.width(part)}; pass the "
                "model's layout=(num_heads, num_kv_heads, head_dim).",
                "layout",
            )
    return layout


def _selection(
    config: S2FTConfig, option: str, units: dict[int, int], ratio: float, rng: random.Random
) -> tuple[tuple[int, int], ...] | None:
    """The given (block, unit) pairs, checked, or ``ratio`` of all units drawn without replacement."""
    if not units:
        return None
    given = getattr(config, option)
    if given is None:
        blocks = sorted(units)
        flat = [(b, u) for b in blocks for u in range(units[b])]  # block-major, as the official layer * n + unit
        return tuple(flat[i] for i in sorted(rng.sample(range(len(flat)), max(1, int(ratio * len(flat))))))
    bad = [(b, u) for b, u in given if b not in units or u >= units[b]]
    if bad or len(set(given)) != len(given):
        what = f"({bad[0][0]}, {bad[0][1]}) is not one" if bad else "a pair appears twice"
        raise OptionError(
            f"s2ft option {option} lists (block, index) pairs of the adapted blocks; {what}. The blocks and their "
            f"{option}: {', '.join(f'{b}: {n}' for b, n in sorted(units.items()))}.",
            option,
        )
    return tuple(sorted(given))
