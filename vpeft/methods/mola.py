"""MoLA: LoRA experts with a layer-wise expert count (Gao, Chen, Rao, Sun, Liu, Peng, Zhang, Guo, Yang and
Subrahmanian, "Higher Layers Need More LoRA Experts", arXiv:2402.08562; NAACL 2025 Findings as "MoLA: MoE LoRA with
Layer-wise Expert Allocation").

Every adapted Linear of block l holds E_l LoRA experts ``(A_i, B_i)`` and a router ``W_g in R^{E_l x d_in}`` on the
layer input; each token goes to its top-k experts, weighted by the router's softmax renormalised over them:

    p = softmax(W_g x),    T = top-k(p),    g_i = p_i / sum_{j in T} p_j  (i in T),  g_i = 0  (i not in T)
    h = W0 x + sum_i g_i (alpha / r) B_i A_i dropout(x)

``A_i`` is Kaiming-uniform (nn.Linear's init), ``B_i`` zeros, so the adapted model equals the base model at
initialisation; the router is Kaiming-uniform too (``reset_lora_parameters_MoE`` in the official code). The expert
count depends on depth: ``experts`` gives one count per group of equally many consecutive blocks, and the model's
blocks are split into that many groups (block l of L is in group ``floor(l G / L)``). The paper's shapes, for LLaMA-2's
32 blocks in 4 groups of 8 (each 160 experts in all):

    inverted_triangle  2, 4, 6, 8   MoLA-▽, the paper's best and the default: more experts in higher layers
    triangle           8, 6, 4, 2   MoLA-△
    hourglass          8, 2, 2, 8   MoLA-⋈
    rectangle          5, 5, 5, 5   MoLA-□, the same count in every layer

``experts`` takes one of these names or the counts themselves (``experts=(8,)``: 8 experts in every block). Only
2/4/6/8 could be checked here (the official README's ``--number_experts``); the other three are the paper's shapes as
this file's author recalls them (each 20 experts per four groups, as the paper compares at one total), not checked
against the PDF. The block count L is read from the model when the adapter is made (the length of the block list the
targets sit in) and kept in the config as ``num_layers``, so a saved adapter rebuilds without the model's help.
Parameters per target: ``E_l (r (d_in + d_out) + d_in)``.

Load balance. The official code has an optional auxiliary loss (``--obalance``, off by default, weight 0.001):
Switch Transformer's ``E sum_i f_i P_i`` per block, over the router outputs of all the block's targets together, with
``f_i`` the share of the block's top-k assignments that went to expert i and ``P_i`` the mean router probability of
expert i, summed over the blocks. Here it is ``balance`` (default 0, as the official default; the official weight
when on is 0.001), computed by :meth:`MoLA.loss` from what each layer kept of its last training forward pass:

* each adapted layer keeps its router probabilities and top-k choices of its latest forward pass in training mode
  (overwritten by the next one, taken and cleared by ``loss``), and nothing in evaluation mode, where ``loss`` is None;
* the training loop calls ``vpeft.method_loss`` after each micro-batch's forward pass and divides it by the number of
  micro-batches of the step, so with gradient accumulation the step's auxiliary loss is the mean over its
  micro-batches, each computed on its own tokens (as the official code's, which computes it per forward pass);
* padding positions count as tokens (a layer sees no attention mask); the official code does the same.

Departures from the official code (``GCYZSL/MoLA``, ``src/mola_lora_hacked.py``, ``Linear_MoE``): the experts are
computed densely, every expert on every token with the unselected ones weighted by an exact zero (the same output and
gradients as its per-expert gather, at the cost of one LoRA of rank ``E_l r``), and share one dropout mask on x (the
official draws one per expert's gathered tokens); one ``top_k`` for every block (the official takes one per block; all
its runs use 2); the router softmax runs in float32 only for half-precision models (the official: always float32).
Defaults are the official script's: r = 8, alpha = 16, dropout 0.05, top-2, on q, k, v, o, up and down (``targets``
roles; the official also adapts Llama's ``gate_proj``: add ``"mlp.gate_proj"`` to ``targets`` on Llama-family models,
which other models lack). Wraps Linear (and HF Conv1D) and fused-projection slices (each slice its own router). Not
mergeable: the mixture weights depend on the token.

Cost: a training step takes 1.31x LoRA's (r = 8 on the same six roles) at the defaults with ``balance=0.001``, with
628,160 parameters against 117,760: a random Llama 256 wide with 4 blocks, batch 4 x 128, one thread, process CPU
time, medians of 5 rounds (``python V-PEFT-Bench/perf/experts_speed.py``, this project's loaded 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (
    AdapterModule,
    DropProbability,
    FiniteFloat,
    MethodConfig,
    NonNegativeFloat,
    PositiveInt,
    Rank,
    Target,
    walk,
)
from ..errors import OptionError
from ._blocks import dropout

PATTERNS: dict[str, tuple[int, ...]] = {
    "inverted_triangle": (2, 4, 6, 8),
    "triangle": (8, 6, 4, 2),
    "hourglass": (8, 2, 2, 8),
    "rectangle": (5, 5, 5, 5),
}


@dataclass
class MoLAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    r: Rank = 8  # rank of every expert
    alpha: FiniteFloat = 16.0  # every expert's update is scaled by alpha / r
    dropout: DropProbability = 0.05  # on the experts' input (one mask for all experts of a target)
    experts: Literal[tuple(PATTERNS)] | tuple[PositiveInt, ...] = "inverted_triangle"  # per depth group, low to high
    top_k: PositiveInt = 2  # experts per token
    balance: NonNegativeFloat = 0.0  # weight of the load-balancing loss (official: off; 0.001 when on)
    num_layers: PositiveInt | None = None  # blocks the pattern spreads over; None: counted from the model

    def counts(self) -> tuple[int, ...]:
        return PATTERNS[self.experts] if isinstance(self.experts, str) else self.experts

    def check(self) -> None:
        if not self.counts():
            raise OptionError("mola option experts=() gives no expert count; give at least one, e.g. (8,).", "experts")
        if self.top_k > min(self.counts()):
            raise OptionError(
                f"mola option top_k={self.top_k} exceeds the fewest experts of a block, {min(self.counts())} "
                f"(experts={self.experts!r}): each token picks top_k of its block's experts, so top_k must be at most "
                f"{min(self.counts())}.",
                "top_k",
            )

    def experts_at(self, index: int | None) -> int:
        """The expert count of block ``index`` (a target outside any block counts as the first)."""
        counts = self.counts()
        if index is None or self.num_layers is None:
            return counts[0]
        return counts[min(index * len(counts) // self.num_layers, len(counts) - 1)]


def count_blocks(model: nn.Module, targets: list[Target]) -> int:
    """The length of the block list the targets sit in: ``model.layers.0 ... model.layers.{L-1}`` gives L (the largest
    such list over the targets; 1 when no target sits in a numbered block)."""
    paths = [p.split(".") for p, _ in walk(model)]
    blocks = 1
    for target in targets:
        pieces = target.name.split(".")
        at = next((i for i, piece in enumerate(pieces) if piece.isdigit()), None)
        if at is None:
            continue
        prefix = pieces[:at]
        found = {int(p[at]) for p in paths if len(p) > at and p[:at] == prefix and p[at].isdigit()}
        blocks = max(blocks, max(found) + 1)
    return blocks


class RouterStash:
    """What one adapted layer's router decided in its latest training forward pass, for the method's loss.

    Not an ``nn.Module`` buffer: it is never saved, and a copy of the model (``copy.deepcopy``, pickling) starts
    empty, as the tensors belong to one autograd graph."""

    def __init__(self) -> None:
        self.value: tuple[Tensor, ...] | None = None

    def take(self) -> tuple[Tensor, ...] | None:
        value, self.value = self.value, None
        return value

    def __deepcopy__(self, memo: dict) -> RouterStash:
        return RouterStash()

    def __getstate__(self) -> dict:
        return {"value": None}


class LoRAExperts(AdapterModule):
    """E LoRA experts and a router on one target; subclasses say how router probabilities become expert weights
    (:meth:`gates`) and what of the routing their loss needs (:meth:`keep`)."""

    wraps = ("linear",)
    mergeable = False

    def __init__(self, target: Target, config: Any, shared: nn.Module | None, experts: int):
        super().__init__(target, config, shared)
        r, d_in, d_out = config.r, target.in_features, target.out_features
        self.experts, self.r, self.scale = experts, r, config.alpha / r
        self.dropout = dropout(config.dropout)
        self.collect = False  # keep routing statistics for the loss (set by subclasses whose loss is on)
        self.__dict__["stash"] = RouterStash()
        router = torch.empty(experts, d_in)  # (E, in): nn.Linear(in, E, bias=False)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))
        a = torch.empty(experts, r, d_in)  # (E, r, in): expert i's A is a[i], initialised as nn.Linear(in, r)
        for expert in a:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        self.router = nn.Parameter(router)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(d_out, experts, r))  # (out, E, r): expert i's B is [:, i]

    def probabilities(self, x: Tensor) -> Tensor:
        """The router's softmax over the experts, ``(..., E)``; in float32 for half-precision inputs."""
        logits = F.linear(x, self.router)
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        return torch.softmax(logits, dim=-1, dtype=dtype)

    def gates(self, probs: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Expert weights ``(..., E)`` (zero for unselected experts) and what the loss needs of this pass."""
        raise NotImplementedError

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        gates, kept = self.gates(self.probabilities(x))
        if self.training and self.collect:
            self.stash.value = kept
        e, r = self.experts, self.r
        h = F.linear(self.dropout(x), self.lora_A.reshape(e * r, -1))  # (..., E r): every expert's A x at once
        h = (h.unflatten(-1, (e, r)) * gates.to(h.dtype).unsqueeze(-1)).flatten(-2)  # expert i's rows times g_i
        return y + self.scale * F.linear(h, self.lora_B.reshape(-1, e * r))  # sum_i g_i B_i A_i x

    def expert_update(self, x: Tensor, expert: int) -> Tensor:
        """``(alpha / r) B_i A_i x`` of one expert (without dropout): for tests and inspection."""
        return self.scale * F.linear(F.linear(x, self.lora_A[expert]), self.lora_B[:, expert])


class MoLA(LoRAExperts):
    Config = MoLAConfig

    def __init__(self, target: Target, config: MoLAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared, config.experts_at(target.index))
        self.top_k, self.block = config.top_k, target.index
        self.collect = config.balance > 0

    @classmethod
    def prepare(cls, config: MoLAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> MoLAConfig:
        if config.num_layers is not None:
            return config
        return dataclasses.replace(config, num_layers=count_blocks(model, targets))

    def gates(self, probs: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        top, chosen = probs.topk(self.top_k, dim=-1)  # (..., k)
        gates = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        picked = torch.zeros_like(probs).scatter(-1, chosen, 1.0)  # (..., E): 1 where chosen
        return gates, (probs, picked)

    @classmethod
    def loss(cls, config: MoLAConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        """``balance * sum_blocks E sum_i f_i P_i`` over the routing each layer kept of its latest training pass."""
        blocks: dict[int | None, list[tuple[Tensor, ...]]] = {}
        for layer in layers:
            kept = layer.stash.take()
            if kept is not None:
                blocks.setdefault(layer.block, []).append(kept)
        if config.balance == 0 or not blocks:
            return None
        terms = [balance_loss([p for p, _ in kept], [c for _, c in kept]) for kept in blocks.values()]
        return config.balance * torch.stack(terms).sum()


def balance_loss(probs: list[Tensor], picked: list[Tensor]) -> Tensor:
    """Switch Transformer's load balance ``E sum_i f_i P_i`` over the tokens of several routers with E experts each:
    ``P_i`` the mean router probability of expert i, ``f_i`` expert i's share of the top-k assignments ``picked``
    (0/1 per token and expert), both over all tokens of all the routers."""
    e = probs[0].shape[-1]
    p = torch.cat([t.reshape(-1, e) for t in probs])  # (N, E)
    f = torch.cat([t.reshape(-1, e) for t in picked])  # (N, E)
    return e * (f.sum(0) / f.sum() * p.mean(0)).sum()
