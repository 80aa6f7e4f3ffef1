"""HALO: Hadamard-assisted lower-precision optimisation (Ashkboos et al., "HALO: Hadamard-Assisted Lower-Precision
Optimization for LLMs", arXiv:2501.02625; official code ``IST-DASLab/HALO``, ``qllmt/nn/halo*_fns.py``), in its
LoRA form: the frozen base's matrix multiplications run in low precision after Hadamard rotations that spread
outliers, and a LoRA update trains on top.

In training, each target's base matmul is

    forward   Y  = Q(X H) Q(W H)^T                          (= X W^T up to quantisation, since H H^T = I)
    backward  dX = Q(dY H') Q(W^T H')^T                     (= dY W up to quantisation)

with ``Q`` symmetric round-to-nearest per row (per token of X and dY, per output channel of W H, per input
channel of W^T H') at ``bits`` (8: INT8), and H, H' block-diagonal Sylvester Hadamard matrices, normalised, over the
input and output widths (blocks: the largest power of 2 that divides the width, at most ``block``). The integer
GEMMs are emulated: the integer codes are multiplied in the input's floating dtype and rescaled. The LoRA update
(alpha / r) B A x, its own small matmuls, runs in full precision. Outside training (eval) the base runs as it is, so
the trained LoRA is a plain LoRA on the original weights: ``disabled()`` is the base model exactly, merge adds
``(alpha / r) B A`` (written as a new weight, W0 kept aside for unmerge: a replaced base, vpeft/core/layers.py), and
it exports to Hugging Face PEFT as LoRA.

Defaults: INT8 (the official INT8 kernels; FP8 and FP6 are not emulated), both GEMMs rotated and quantised (the
official level 2 also quantises the weight-gradient GEMM, which a frozen base does not have), LoRA r = 8,
alpha = 16 on every Linear of every block. Departures: no CUDA kernels (CPU emulation: no speed-up, the point is the
numerics), no HQ-FSDP, and the quantised operands are not kept for backward (the frozen weight is rotated and
quantised again there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import DropProbability, FiniteFloat, PositiveInt, Target, weight_and_bias
from ._quant import Bits, block_size, hadamard, quantise_rows, rotate
from .lora import LoRA, LoRAConfig


@dataclass
class HALOConfig(LoRAConfig):
    targets: tuple[str, ...] = ("in_block",)
    alpha: FiniteFloat = 16.0
    dropout: DropProbability = 0.0
    bits: Bits = 8
    block: PositiveInt = 256  # the largest Hadamard block
    quantise_backward: bool = True  # dX from a rotated low-precision GEMM too


class _HaloMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, h_in: Tensor, h_out: Tensor, bits: int, backward: bool) -> Tensor:
        ctx.save_for_backward(weight, h_out)
        ctx.bits, ctx.quantise = bits, backward
        return halo_matmul(x, weight, h_in, bits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, h_out = ctx.saved_tensors
        if ctx.quantise:
            grad_x = halo_matmul(grad, weight.T, h_out, ctx.bits)  # Q(dY H') Q(W^T H')^T
        else:
            grad_x = grad @ weight
        return grad_x, None, None, None, None, None


def halo_matmul(x: Tensor, weight: Tensor, h: Tensor, bits: int) -> Tensor:
    """``Q(x H) Q(weight H)^T``: ``x`` (..., k), ``weight`` (n, k), ``h`` the normalised Hadamard block of H."""
    xq, xs = quantise_rows(rotate(x, h), bits)
    wq, ws = quantise_rows(rotate(weight, h), bits)
    return (xq @ wq.T) * xs * ws.T


class HALO(LoRA):
    Config = HALOConfig
    wraps = ("linear",)
    replaces_base = True

    def __init__(self, target: Target, config: HALOConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.__dict__["base"] = target.module  # not registered: the base's own tensors
        self.bits, self.quantise_backward = config.bits, config.quantise_backward
        weight, _ = target.weight_and_bias()
        for name, width in (("h_in", weight.shape[1]), ("h_out", weight.shape[0])):
            k = block_size(width, config.block)
            self.register_buffer(name, hadamard(k, torch.float64).div(k**0.5).to(weight.dtype), persistent=False)

    def base_forward(self, x: Tensor, initial: bool = False) -> Tensor:
        if not self.training:
            return self.base(x)  # the base as it is: inference is full precision
        weight, bias = weight_and_bias(self.base)
        y = _HaloMatmul.apply(x, weight, self.h_in, self.h_out, self.bits, self.quantise_backward)
        return y + bias if bias is not None else y

    def effective_weight(self, initial: bool = False) -> Tensor:
        weight, _ = weight_and_bias(self.base)
        return weight + self.delta_weight().to(weight.dtype)
