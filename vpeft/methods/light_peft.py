"""Light-PEFT: masked early pruning of the foundation model and multi-granularity early pruning of PEFT (Gu et al.,
"Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning", Findings of ACL 2024; code
gccnlp/Light-PEFT).

A LoRA on every projection of every block trains alongside trainable soft masks on the frozen model's attention
heads and FFN neurons; after a short estimation phase the least important heads, neurons, LoRA modules and LoRA ranks
are removed physically, and training continues on the smaller model with the smaller PEFT:

    estimation (steps 0 .. S-1, S = round(estimate * total steps)):
        P_h <- m_h P_h                 (head h's attention probabilities; here: its input columns of the attention
                                        output projection, o(sum_h m_h P_h V_h) = o(concat_h m_h P_h V_h), the same)
        a   <- m_ffn * a               (the FFN's intermediate activations, the down projection's input)
        h   = W0 x + (alpha / r) B A x  on q, k, v, the attention output and both FFN projections (x masked as above)
        L   = L_task + l1 * sum |m|     (masks start at 1; their learning rates are 100x (heads) and 50x (neurons))
    importance (over the second half of the estimation, steps S/2 .. S-1):
        module  I_mod = mean over training forwards of mean_tokens ||(alpha/r) B A x||_2 / ||W0 x + b||_2
        rank    I_i   = mean over steps of |g_i dL/dg_i| at g = 1, g a mask on LoRA's ranks (h = ... + B diag(g) A x);
                        computed as |sum_j A_ij dL/dA_ij|, which equals dL/dg_i at g = 1 (no extra tensor)
    pruning (at the start of step S, through the control hook, vpeft/core/control.py):
        heads    per block, the round(head_ratio * H) of smallest m_h (layerwise, as the official script)
        neurons  over all blocks, the round(neuron_ratio * N) of smallest m_ffn (global, as the official script)
        modules  over all LoRA modules, the round(module_ratio * M) of smallest I_mod (they become rank 0)
        ranks    over the remaining modules' ranks, the round(rank_ratio * R) of smallest I_i
    then the base model's rows and columns of the pruned heads and neurons are removed (vpeft/methods/_prune.py), the
    LoRA tensors lose the same rows and columns and the pruned ranks, the masks are dropped (the kept heads and
    neurons run at 1 again, as the official second training does) and the optimiser's moments follow the kept
    entries. The structure is recorded in the config (``heads``, ``neurons``, ``ranks``), so a checkpoint, a saved
    adapter and ``--resume`` prune a fresh base model the same way before loading the tensors.

Defaults are the official scripts' (RoBERTa-large on GLUE, ``scripts/estimate.sh`` and ``scripts/train.sh``): LoRA
r = 8, alpha = 16, dropout 0.05 on query, key, value, the attention output and both FFN projections; l1 = 1e-4,
mask learning-rate multipliers 100 (heads) and 50 (neurons); pruning ratios 1/3 of the heads, 1/3 of the FFN
neurons, 75 % of the LoRA modules and 50 % of the remaining ranks; estimation 4 % of the run (the official estimate
is 800 steps, a separate run, before a 10-epoch training of about 21,000 steps on SST-2).

Departures from the official code: one run instead of two (the official code estimates in one run, then restarts from
the pre-trained weights pruned, with the estimation's LoRA weights pruned as here); counts ``round(ratio * n)``
instead of ``np.quantile`` thresholds, so ties (masks that never moved) still prune the stated share and a block keeps
at least one head and one neuron; the module importance averages over all tokens, padding included (the official
code skips padding); the rank importance is the paper's rank-mask sensitivity, where the official code sums
``|mean_j A*dA|`` and ``|mean_k B*dB|`` (the same quantity times 1/d_in + 1/d_out, so its global ranking favours
narrow modules), and both are read from the gradients the training loop hands ``on_step`` (after its gradient
clipping, a common factor within a step); the masks are kept out of weight decay. On Llama the LoRA targets are the
official ones by role (``mlp_in`` is ``up_proj``): ``gate_proj`` has no LoRA, and loses the pruned neurons' rows.
With grouped-query attention (Llama), a block keeps ``c = max(1, round((H - pruned) / KV))`` query heads per
key/value group, its c of largest mask, so that the groups stay equal (the model maps query head h to key/value head
h // group) and no key/value head is removed.
Prunes HF BERT-style encoders and Llama-style decoders; refuses models with a fused qkv (GPT-2, timm ViT).
Not restorable: after pruning the base model is smaller, and ``disabled()`` has no original model to run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (
    DropProbability,
    FiniteFloat,
    NonNegativeFloat,
    PositiveFloat,
    ProperFraction,
    Rank,
    StepContext,
    Target,
    walk,
)
from ..errors import OptionError
from . import _prune
from .lora import LoRA, LoRAConfig


@dataclass
class LightPEFTConfig(LoRAConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    r: Rank = 8
    alpha: FiniteFloat = 16.0
    dropout: DropProbability = 0.05
    estimate: ProperFraction = 0.04  # share of the run's steps before the pruning step
    l1: NonNegativeFloat = 1e-4  # coefficient of sum |m| over the masks
    attn_mask_lr: PositiveFloat = 100.0  # learning-rate multiplier of the head masks
    ffn_mask_lr: PositiveFloat = 50.0  # of the FFN neuron masks
    head_ratio: NonNegativeFloat = 1 / 3  # share of each block's heads pruned
    neuron_ratio: NonNegativeFloat = 1 / 3  # share of all FFN neurons pruned
    module_ratio: NonNegativeFloat = 0.75  # share of the LoRA modules removed
    rank_ratio: NonNegativeFloat = 0.5  # share of the remaining LoRA ranks removed
    # decided by prepare (the role of each target in its block) and by the pruning step (the structure)
    roles: tuple[str, ...] = ()  # per target: q, k, v, o (attention output), in, out (FFN), or "" (LoRA only)
    head_dim: int = 0
    pruned: bool = False
    heads: tuple[str, ...] = ()  # per block: the kept query heads, "0,2,3"
    neurons: tuple[str, ...] = ()  # per block: the kept FFN neurons, a hexadecimal bit mask (bit i: neuron i)
    ranks: tuple[int, ...] = ()  # per target: its rank after pruning (0: removed)

    def check(self) -> None:
        for name in ("head_ratio", "neuron_ratio", "module_ratio", "rank_ratio"):
            if getattr(self, name) >= 1:
                raise OptionError(f"light_peft option {name}={getattr(self, name)} must be below 1: it is the share "
                                  "pruned, and something must remain.", name)  # fmt: skip
        if self.pruned and not (self.heads and self.neurons and self.ranks):
            raise OptionError("light_peft option pruned=true needs heads, neurons and ranks (written by the pruning "
                              "step); leave pruned at false for a new adapter.", "pruned")  # fmt: skip


class LightPEFT(LoRA):
    Config = LightPEFTConfig
    lora_variant = None  # masks on W0's inputs until pruned
    wraps = ("linear",)
    restorable = False  # the pruning step removes rows and columns of the base weights
    no_weight_decay = ("attn_mask", "ffn_mask")

    def __init__(self, target: Target, config: LightPEFTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.position, self.path = target.position, target.name
        self.role = config.roles[target.position] if config.roles else ""
        rank = config.ranks[target.position] if config.ranks else config.r
        if rank != config.r:  # rebuilt after pruning: shapes only, the values come from the file
            self.lora_A = nn.Parameter(torch.zeros(rank, target.in_features))
            self.lora_B = nn.Parameter(torch.zeros(target.out_features, rank))
        live = not config.pruned
        self.head_dim = config.head_dim
        # m_h, one per head of the attention output's input; m_ffn, one per input of the FFN's down projection (empty
        # after pruning, where the optimiser and the saved file keep them as such); the other targets have none
        if self.role == "o":
            self.attn_mask = nn.Parameter(torch.ones(target.in_features // config.head_dim if live else 0))
        if self.role == "out":
            self.ffn_mask = nn.Parameter(torch.ones(target.in_features if live else 0))
        # importance accumulators (saved: a resumed run prunes the same way): [sum, count] and [sum per rank, count]
        self.register_buffer("module_score", torch.zeros(2 if live else 0))
        self.register_buffer("rank_score", torch.zeros(rank + 1 if live else 0))
        self.recording = False  # set by the controller during the second half of the estimation

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def masks(self) -> dict[str, nn.Parameter]:
        """This layer's masks that are live (not yet pruned), by name."""
        return {n: m for n in ("attn_mask", "ffn_mask") if (m := getattr(self, n, None)) is not None and m.numel()}

    def gate(self) -> Tensor | None:
        """The mask on this layer's input columns: a head mask repeated over the head's width, or the neuron mask."""
        masks = self.masks()
        if "attn_mask" in masks:
            return masks["attn_mask"].repeat_interleave(self.head_dim)
        return masks.get("ffn_mask")

    def adapt_input(self, x: Tensor) -> Tensor:
        g = self.gate()
        return x if g is None else x * g

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if self.rank == 0:
            return y
        update = self.scale * F.linear(F.linear(self.dropout(self.adapt_input(x)), self.lora_A), self.lora_B)
        if self.recording and self.training:
            with torch.no_grad():
                ratio = update.norm(dim=-1) / y.norm(dim=-1).clamp_min(torch.finfo(y.dtype).tiny)
                self.module_score += torch.stack([ratio.mean(), ratio.new_ones(())]).to(self.module_score)
        return y + update

    def delta_weight(self) -> Tensor:
        if self.gate() is not None:
            raise ValueError("light_peft's masks scale W0 itself, so its update is no weight delta; merge folds both.")
        return super().delta_weight()

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W0 + (alpha / r) B A) diag(g)``: the mask scales the input that both read."""
        update = weight + (self.scale * (self.lora_B @ self.lora_A)).to(weight.dtype)
        g = self.gate()
        return (update if g is None else update * g.to(weight.dtype)), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise ValueError("light_peft is not restorable: a merged light_peft adapter cannot be taken out again.")

    # ---- method-level hooks ------------------------------------------------------------------------------------
    @classmethod
    def restructure(cls, config: LightPEFTConfig, model: nn.Module) -> None:
        blocks = _prune.find_blocks(model)  # refuses other families before anything changes
        if not config.pruned:
            return
        if len(config.heads) != len(blocks) or len(config.neurons) != len(blocks):
            raise OptionError(f"light_peft options heads and neurons name {len(config.heads)} and "
                              f"{len(config.neurons)} blocks; {type(model).__name__} has {len(blocks)}: the adapter "
                              "was pruned on another model.", "heads")  # fmt: skip
        heads = [[int(h) for h in s.split(",")] for s in config.heads]
        _prune.prune(model, blocks, heads, [decode(s) for s in config.neurons])

    @classmethod
    def prepare(cls, config: LightPEFTConfig, model: nn.Module, targets: list[Target], calibration: Any):
        blocks = _prune.find_blocks(model)
        role = {}
        for b in blocks:
            role |= {b.q: "q", b.k: "k", b.v: "v", b.o: "o", b.ffn_out: "out", **{p: "in" for p in b.ffn_in}}
        head_dim = _prune.layouts(model, blocks[:1])[0].head_dim
        return dataclasses.replace(config, roles=tuple(role.get(t.name, "") for t in targets), head_dim=head_dim)

    @classmethod
    def lr_multipliers(cls, config: LightPEFTConfig) -> dict[str, float]:
        return {"attn_mask": config.attn_mask_lr, "ffn_mask": config.ffn_mask_lr}

    @classmethod
    def loss(cls, config: LightPEFTConfig, layers: list[LightPEFT], shared: nn.Module | None) -> Tensor | None:
        masks = [m for layer in layers for m in layer.masks().values()]
        if not masks or config.l1 == 0:
            return None
        return config.l1 * sum(m.abs().sum() for m in masks)

    @classmethod
    def on_step(cls, config: LightPEFTConfig, layers: list[LightPEFT], step: int, total_steps: int, optimizer=None):
        """During the second half of the estimation, after the step's backward pass: the rank sensitivities."""
        start, end = recording_steps(config, total_steps)
        if config.pruned or not start <= step < end:
            return
        for layer in layers:
            if layer.rank and layer.lora_A.grad is not None:
                with torch.no_grad():
                    score = rank_sensitivity(layer.lora_A, layer.lora_A.grad)
                    layer.rank_score += torch.cat([score, score.new_ones(1)]).to(layer.rank_score)

    @classmethod
    def control(cls, config: LightPEFTConfig, layers: list[LightPEFT], ctx: StepContext) -> str | None:
        if config.pruned or not layers:
            return None
        start, end = recording_steps(config, ctx.total_steps)
        for layer in layers:
            layer.recording = start <= ctx.step < end
        if ctx.step < end:
            return None
        return prune_step(config, layers, ctx)


def recording_steps(config: LightPEFTConfig, total_steps: int) -> tuple[int, int]:
    """``(S // 2, S)``: the steps whose importance counts; pruning happens at the start of step S."""
    end = max(1, round(config.estimate * total_steps))
    return end // 2, end


def rank_sensitivity(a: Tensor, grad_a: Tensor) -> Tensor:
    """``|g_i dL/dg_i|`` at g = 1 for a rank mask g between A and B: ``|sum_j A_ij dL/dA_ij|`` per rank i."""
    return (a * grad_a).sum(dim=1).abs()


def module_importance(layer: LightPEFT) -> float:
    total, count = layer.module_score.tolist()
    return total / count if count else 0.0


def rank_importance(layer: LightPEFT) -> Tensor:
    count = float(layer.rank_score[-1])
    return layer.rank_score[:-1] / count if count else torch.zeros_like(layer.rank_score[:-1])


def smallest(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` smallest scores (ties: the earlier index first)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return torch.tensor(order[:count], dtype=torch.long)


def choose_heads(mask: Tensor, layout: Any, ratio: float) -> list[int]:
    """The query heads a block keeps (see the module's text: layerwise; equal groups under grouped-query attention)."""
    heads, kv = layout.num_heads, layout.num_kv_heads
    pruned = round(ratio * heads)
    if kv == heads:
        drop = set(smallest(mask, min(pruned, heads - 1)).tolist())
        return [h for h in range(heads) if h not in drop]
    group, per_group = heads // kv, max(1, round((heads - pruned) / kv))
    kept = []
    for g in range(kv):
        members = range(g * group, (g + 1) * group)
        kept += sorted(members, key=lambda h: (-float(mask[h]), h))[:per_group]
    return sorted(kept)


def encode(kept: Tensor, width: int) -> str:
    """Neuron indices ``kept`` of ``width`` as a hexadecimal bit mask (bit i set: neuron i kept)."""
    value = sum(1 << i for i in kept.tolist())
    return format(value, f"0{math.ceil(width / 4)}x")


def decode(mask: str) -> Tensor:
    value = int(mask, 16)
    return torch.tensor([i for i in range(4 * len(mask)) if value >> i & 1], dtype=torch.long)


@dataclass(frozen=True)
class Plan:
    """What the pruning step keeps: query heads and FFN neurons per block, LoRA ranks per module (empty: removed)."""

    heads: list[list[int]]
    neurons: list[Tensor]
    ranks: list[Tensor]


@torch.no_grad()
def decide(config: LightPEFTConfig, layers: list[LightPEFT], model: nn.Module) -> Plan:
    """The structure the masks and importance scores select (see the module's text), on the unpruned model."""
    blocks = _prune.find_blocks(model)
    layouts = _prune.layouts(model, blocks)
    where = block_of(blocks)
    head_masks = {where[x.path]: x.attn_mask.detach().float().cpu() for x in layers if "attn_mask" in x.masks()}
    heads = [choose_heads(head_masks[i], lay, config.head_ratio) if i in head_masks else list(range(lay.num_heads))
             for i, lay in enumerate(layouts)]  # fmt: skip

    ffn_masks = {where[x.path]: x.ffn_mask.detach().float().cpu() for x in layers if "ffn_mask" in x.masks()}
    modules = dict(walk(model))
    widths = [modules[b.ffn_out].in_features for b in blocks]
    owners = sorted(ffn_masks)
    neurons = [torch.arange(w) for w in widths]
    if owners:
        values = torch.cat([ffn_masks[i] for i in owners])
        drop = smallest(values, round(config.neuron_ratio * values.numel()))
        offsets = torch.tensor([0] + [ffn_masks[i].numel() for i in owners]).cumsum(0)
        for j, i in enumerate(owners):
            local = drop[(drop >= offsets[j]) & (drop < offsets[j + 1])] - offsets[j]
            keep = torch.ones(widths[i], dtype=torch.bool)
            keep[local] = False
            if not keep.any():  # a block keeps at least its most important neuron
                keep[int(ffn_masks[i].argmax())] = True
            neurons[i] = keep.nonzero().flatten()

    scores = torch.tensor([module_importance(x) for x in layers], dtype=torch.float64)
    removed = set(smallest(scores, round(config.module_ratio * len(layers))).tolist())
    ranks = [torch.zeros(0, dtype=torch.long) for _ in layers]
    survivors = [j for j in range(len(layers)) if j not in removed and layers[j].rank]
    if survivors:
        values = torch.cat([rank_importance(layers[j]).double().cpu() for j in survivors])
        drop = set(smallest(values, round(config.rank_ratio * values.numel())).tolist())
        start = 0
        for j in survivors:
            r = layers[j].rank
            ranks[j] = torch.tensor([i for i in range(r) if start + i not in drop], dtype=torch.long)
            start += r
    return Plan(heads, neurons, ranks)


def block_of(blocks: list[_prune.Block]) -> dict[str, int]:
    return {p: i for i, b in enumerate(blocks) for p in (b.q, b.k, b.v, b.o, *b.ffn_in, b.ffn_out)}


@torch.no_grad()
def prune_step(config: LightPEFTConfig, layers: list[LightPEFT], ctx: StepContext, plan: Plan | None = None) -> str:
    """Prune the base and the adapter to ``plan`` (default: :func:`decide`'s), the optimiser following, and record
    the structure in the config."""
    model = ctx.model
    plan = plan or decide(config, layers, model)
    blocks = _prune.find_blocks(model)
    layouts = _prune.layouts(model, blocks)
    modules = dict(walk(model))
    widths = [modules[b.ffn_out].in_features for b in blocks]
    where = block_of(blocks)
    heads, neurons = plan.heads, plan.neurons
    _prune.prune(model, blocks, heads, neurons)
    empty = torch.zeros(0, dtype=torch.long)
    for layer, rank in zip(layers, plan.ranks, strict=True):
        rows = cols = None
        i = where.get(layer.path)
        if i is not None and layer.role in ("q", "k", "v") and len(heads[i]) < layouts[i].num_heads:
            rows = _prune.kept_rows(layouts[i], layer.role, heads[i])
        elif i is not None and layer.role == "o" and len(heads[i]) < layouts[i].num_heads:
            cols = _prune.kept_rows(layouts[i], "out", heads[i])
        elif i is not None and layer.role == "in":
            rows = neurons[i]
        elif i is not None and layer.role == "out":
            cols = neurons[i]
        ctx.resize(layer, "lora_A", (rank, cols))
        ctx.resize(layer, "lora_B", (rows, rank))
        for name in layer.masks():
            ctx.resize(layer, name, (empty,))
        layer.module_score = layer.module_score.new_zeros(0)
        layer.rank_score = layer.rank_score.new_zeros(0)
        layer.recording = False

    ranks = [0] * len(layers)
    for layer in layers:  # in target order, as the constructor reads them
        ranks[layer.position] = layer.rank
    ctx.set_config(dataclasses.replace(
        config, pruned=True, heads=tuple(",".join(map(str, h)) for h in heads),
        neurons=tuple(encode(n, w) for n, w in zip(neurons, widths, strict=True)), ranks=tuple(ranks),
    ))  # fmt: skip
    total_heads = sum(lay.num_heads for lay in layouts)
    return (f"light_peft pruned {total_heads - sum(map(len, heads))} of {total_heads} heads, "
            f"{sum(widths) - sum(n.numel() for n in neurons)} of {sum(widths)} FFN neurons, "
            f"{sum(r == 0 for r in ranks)} of {len(layers)} LoRA modules, ranks now {sum(ranks)} of "
            f"{config.r * len(layers)}")  # fmt: skip
