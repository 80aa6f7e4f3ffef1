"""L4Q: parameter-efficient quantisation-aware fine-tuning through LoRA (Jeon et al., "L4Q: Parameter Efficient
Quantization-Aware Fine-Tuning on Large Language Models", ACL 2025, arXiv:2402.04902).

The LoRA update is merged into the weight *before* quantisation, and the merged weight is fake-quantised with
learned step sizes (LSQ, Esser et al., ICLR 2020) and offsets (LSQ+), per output channel or per group:

    W = W0 + (alpha / r) B A,    W_q = round(clamp((W - beta) / s, 0, 2^b - 1)) s + beta,    y = W_q x + b

A, B, the steps ``s`` and the offsets ``beta`` train together; round passes its gradient straight through, and the
step's gradient is LSQ's (eq. 3 there): ``round(v) - v`` inside the range (v = (W - beta) / s), ``0`` below and
``2^b - 1`` above, times ``1 / sqrt(N (2^b - 1))`` (N: weights per step), vpeft/methods/_quant.py ``lsq``. The
model a run ends with is fully quantised: W_q has at most 2^b values per group and no high-precision adapter is left
at inference. As the paper's memory-optimised backward does, the full-size ``W``, ``W_q`` and ``dL/dW`` are
rebuilt layer by layer in the backward pass instead of kept from the forward.

The base keeps its full-precision weight (the quantiser needs W0 every step), so ``disabled()`` is the original
model exactly. Merge writes W_q (dequantised) and keeps W0 aside until unmerge puts it back (vpeft/core/layers.py,
a replaced base); not mergeable into W0 in place, since quantisation does not invert.

Defaults: 4 bits, per output channel (group_size=None), r = 8, alpha = 16 on every Linear of every block; steps
and offsets start from the min-max round-to-nearest grid of W0 (the paper initialises the quantiser from W0; its
exact initialisation and its rank and group settings were not checked against the paper for this implementation).
A is Kaiming-uniform and B zero, LoRA's initialisation, so at the start W_q is W0's round-to-nearest grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, FiniteFloat, MethodConfig, PositiveInt, Rank, Target, weight_and_bias
from ._quant import Bits, eval_weight, groups_of, lsq, minmax_grid, recomputed_linear


@dataclass
class L4QConfig(MethodConfig):
    targets: tuple[str, ...] = ("in_block",)
    r: Rank = 8
    alpha: FiniteFloat = 16.0  # the LoRA update is scaled by alpha / r
    bits: Bits = 4
    group_size: PositiveInt | None = None  # None: one step and offset per output channel
    grad_scale: bool = True  # LSQ's 1 / sqrt(N Q) on the step and offset gradients


class L4Q(AdapterModule):
    Config = L4QConfig
    wraps = ("linear",)
    mergeable = True
    identity_at_init = False  # W_q at init is W0's round-to-nearest grid
    replaces_base = True

    def __init__(self, target: Target, config: L4QConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.__dict__["base"] = target.module  # W0 and the bias are read from it; not registered
        weight, _ = target.weight_and_bias()  # (out, in)
        out, width = weight.shape
        groups = groups_of(width, config.group_size, "l4q", target.key)
        step, zero, _ = minmax_grid(weight, config.bits, groups)
        self.scale, self.bits = config.alpha / config.r, config.bits
        self.grad_scale = 1 / math.sqrt(width // groups * ((1 << config.bits) - 1)) if config.grad_scale else 1.0
        self.step = nn.Parameter(step.to(weight.dtype))  # (out, groups)
        self.offset = nn.Parameter((-zero * step).to(weight.dtype))  # beta = -z s: code z stands for 0
        self.lora_A = nn.Parameter(torch.empty(config.r, width, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out, config.r, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def quantised(self, lora_A: Tensor, lora_B: Tensor, step: Tensor, offset: Tensor) -> Tensor:
        """``W_q`` (out, in): the fake-quantised merge of W0 and the LoRA update."""
        weight, _ = weight_and_bias(self.base)
        merged = weight + self.scale * (lora_B @ lora_A)
        out, width = merged.shape
        grouped = merged.view(out, step.shape[1], -1)
        return lsq(grouped, step[..., None], offset[..., None], self.bits, self.grad_scale).view(out, width)

    def base_forward(self, x: Tensor, initial: bool = False) -> Tensor:
        bias = getattr(self.base, "bias", None)
        state = (self.lora_A, self.lora_B, self.step, self.offset)
        if not self.training and not torch.is_grad_enabled():  # generation: W_q built once while nothing changes
            w0 = weight_and_bias(self.base)[0]  # in the key too: a merge swaps the layer's weight
            return F.linear(x, eval_weight(self, lambda *t: self.quantised(*t[:4]), (*state, w0)), bias)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in state):
            return F.linear(x, self.quantised(*state), bias)
        return recomputed_linear(x, bias, self.quantised, *state)

    def effective_weight(self, initial: bool = False) -> Tensor:
        return self.quantised(self.lora_A, self.lora_B, self.step, self.offset)

    def train(self, mode: bool = True) -> L4Q:
        self.__dict__.pop("eval_weight", None)
        return super().train(mode)
