"""What the quantised-base methods share (PEQA, L4Q, SketchTune, HALO): bit packing, round-to-nearest grids, the LSQ
fake quantiser, Hadamard rotations and a linear layer whose weight is rebuilt in the backward pass.

* :func:`pack` / :func:`unpack`: integer codes below ``2**bits`` stored as ``uint8`` bytes, exactly ``bits / 8``
  bytes a code (4-bit: two codes a byte, the first in the low nibble; other widths as a little-endian bit stream).
* :func:`minmax_grid`: the asymmetric round-to-nearest grid of GPTQ's ``Quantizer`` (range widened to hold 0):
  ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``, ``code = clamp(round(w / scale) + zero)``.
* :func:`lsq`: LSQ fake quantisation (Esser et al., "Learned Step Size Quantization", ICLR 2020, eq. 1-3) with the
  learnable offset of LSQ+ (Bhalgat et al., CVPRW 2020).
* :func:`hadamard` / :func:`rotate`: the Sylvester Hadamard matrix and a block-diagonal rotation by it.
* :func:`recomputed_linear`: ``x W^T + b`` where ``W = weight_fn(*state)`` is never kept for backward: the backward
  pass rebuilds it from the (small) trainable state, so a training step holds one layer's full weight at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Le
from torch import Tensor, nn

from ..core import AdapterModule, Target
from ..errors import ConfigError

Bits = Annotated[int, Ge(2), Le(8)]  # integer widths the packing stores (2..8 bits a code)


# ---- packing ---------------------------------------------------------------------------------------------------
def pack(codes: Tensor, bits: int) -> Tensor:
    """``codes`` (any shape, values in ``[0, 2^bits)``) as a flat ``uint8`` tensor of ``ceil(n * bits / 8)`` bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        flat = F.pad(flat, (0, flat.numel() % 2))
        return flat[0::2] | (flat[1::2] << 4)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # the bits of each code, lowest first
    stream = F.pad(stream, (0, -stream.numel() % 8)).view(-1, 8)
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (stream * weights).sum(1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes, as ``uint8``."""
    if bits == 8:
        return packed[:n]
    if bits == 4:
        return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n]
    stream = (packed[:, None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    stream = stream.reshape(-1)[: n * bits].view(n, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(1, dtype=torch.uint8)


def groups_of(in_features: int, group_size: int | None, method: str, key: str) -> int:
    """How many column groups a row of ``in_features`` splits into (``None``: one, per output channel)."""
    if group_size is None:
        return 1
    if in_features % group_size:
        raise ConfigError(
            f"{method} option group_size={group_size} does not divide the input width {in_features} of target "
            f"{key!r}; use a divisor of every target's input width, or group_size=None (one group per output channel)."
        )
    return in_features // group_size


# ---- round-to-nearest grids ------------------------------------------------------------------------------------
def minmax_grid(weight: Tensor, bits: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale (out, groups), zero (out, groups), codes (out, in))`` of the asymmetric RTN grid, in float32 whatever
    the weight's dtype (a float64 model gets the codes of its float32 twin); the zeros and codes are integers."""
    out = weight.shape[0]
    w = weight.detach().float().reshape(out, groups, -1)
    top = (1 << bits) - 1
    low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (high - low) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, codes = zero
    zero = torch.round(-low / scale)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, top)
    return scale, zero, codes.reshape(weight.shape)


def lsq(w: Tensor, step: Tensor, offset: Tensor, bits: int, grad_scale: float) -> Tensor:
    """LSQ+ fake quantisation of ``w`` (out, groups, g) with step and offset (out, groups, 1), unsigned grid
    ``[0, 2^b - 1]``: ``w_q = round(clamp((w - offset) / step, 0, Q)) * step + offset``.

    Gradients (LSQ eq. 3, round passed straight through): ``d w_q / d w`` = 1 inside the range, 0 outside;
    ``d w_q / d step`` = ``round(v) - v`` inside (v = (w - offset) / step), ``0`` below, ``Q`` above, times
    ``grad_scale`` (LSQ's ``1 / sqrt(N Q)``); ``d w_q / d offset`` = 0 inside, 1 outside, times ``grad_scale`` too.
    """
    step = step * grad_scale + (step - step * grad_scale).detach()  # value step, gradient scaled by grad_scale
    offset = offset * grad_scale + (offset - offset * grad_scale).detach()
    v = torch.clamp((w - offset) / step, 0, (1 << bits) - 1)
    return (torch.round(v) - v).detach() * step + v * step + offset


# ---- Hadamard rotations ----------------------------------------------------------------------------------------
def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of 2) with entries +-1: ``H H^T = n I`` exactly."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def block_size(width: int, largest: int) -> int:
    """The largest power of 2 that divides ``width`` and is at most ``largest``: the block of a block-diagonal
    Hadamard rotation of ``width`` columns (576 = 9 x 64 rotates in blocks of 64)."""
    return math.gcd(width, 1 << int(math.log2(largest)))


def rotate(x: Tensor, h: Tensor) -> Tensor:
    """``x`` times the block-diagonal orthogonal matrix with blocks ``h`` (k, k) on its last dimension."""
    k = h.shape[0]
    return (x.reshape(*x.shape[:-1], -1, k) @ h).reshape(x.shape)


def quantise_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest per row of the last dimension: ``(codes, scale)`` with ``x ~ codes * scale``,
    codes integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (held in ``x``'s dtype), each element off by at most
    ``scale / 2``."""
    top = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / scale), -top, top), scale


def eval_weight(module: nn.Module, build: Callable[..., Tensor], state: tuple[Tensor, ...]) -> Tensor:
    """``build(*state)``, kept on ``module`` between calls while ``state`` is unchanged (the same tensors at the same
    version counters, which every in-place change, an optimiser step included, advances). For evaluation without
    grad, where generation calls each layer once a token: the dequantised weight is built once, as SketchTune's own
    ``fast`` evaluation dequantises into the layer's weight; a module drops it when set to train."""
    key = tuple((id(t), t._version) for t in state)
    kept = module.__dict__.get("eval_weight")
    if kept is None or kept[0] != key:
        kept = (key, build(*state))
        module.__dict__["eval_weight"] = kept
    return kept[1]


# ---- a linear layer whose weight is rebuilt for backward -------------------------------------------------------
class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, weight_fn: Callable[..., Tensor], *state: Tensor) -> Tensor:
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(x, *state)
        with torch.no_grad():
            return F.linear(x, weight_fn(*state), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *state = ctx.saved_tensors
        wants = ctx.needs_input_grad
        leaves = [s.detach().requires_grad_(w) for s, w in zip(state, wants[3:], strict=True)]
        with torch.enable_grad():
            weight = ctx.weight_fn(*leaves)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ weight.detach()) if wants[0] else None
        grad_b = flat.sum(0) if wants[1] else None
        trained = [leaf for leaf, w in zip(leaves, wants[3:], strict=True) if w]
        grads = iter(torch.autograd.grad(weight, trained, flat.T @ x.reshape(-1, x.shape[-1])) if trained else ())
        return (grad_x, grad_b, None, *(next(grads) if w else None for w in wants[3:]))


def recomputed_linear(x: Tensor, bias: Tensor | None, weight_fn: Callable[..., Tensor], *state: Tensor) -> Tensor:
    """``F.linear(x, weight_fn(*state), bias)`` whose backward rebuilds the weight from ``state`` (the trainable
    tensors it depends on, in order) instead of keeping it: the gradient of each state tensor is that of the weight,
    ``dL/dW = dY^T X``, pulled back through ``weight_fn`` by autograd. The memory-optimised backward L4Q describes."""
    return _Recomputed.apply(x, bias, weight_fn, *state)


# ---- a released base held packed -------------------------------------------------------------------------------
class PackedBase(AdapterModule):
    """A whole Linear (or HF Conv1D) whose frozen weight this module holds as packed integer codes, turned back into
    a weight by :meth:`dequantised` from the trainable quantisation state (scales, codebooks). The layer's own
    full-precision weight is freed when the adapter is added (``releases_base``, vpeft/core/layers.py): disabled,
    the layer computes with the state as first built (``initial``), merge writes the dequantised weight. Training
    holds the packed codes only (the dequantised weight of one layer at a time, rebuilt in backward); evaluation
    without grad keeps each layer's dequantised weight between calls while the state is unchanged (:func:`eval_weight`),
    so generation does not unpack every weight once a token."""

    wraps = ("linear",)
    mergeable = True
    identity_at_init = False  # the quantised base differs from the full-precision one
    replaces_base = True
    releases_base = True

    def store(self, target: Target, codes: Tensor, bits: int) -> None:
        """Keep ``codes`` (out, in) packed at ``bits`` a code; not saved with the adapter (rebuilt at load)."""
        self.__dict__["base"] = target.module  # for its bias; not registered, so not an adapter tensor
        self.bits, self.shape = bits, tuple(codes.shape)
        self.register_buffer("codes", pack(codes, bits), persistent=False)

    def unpacked(self) -> Tensor:
        """The codes, ``(out, in)`` ``uint8``."""
        return unpack(self.codes, self.bits, self.shape[0] * self.shape[1]).view(self.shape)

    def dequantised(self, *state: Tensor) -> Tensor:
        """``(out, in)``: the weight the codes and ``state`` (the tensors of :meth:`state`) stand for."""
        raise NotImplementedError

    def state(self, initial: bool) -> tuple[Tensor, ...]:
        """The quantisation state :meth:`dequantised` reads: trained, or as first built."""
        raise NotImplementedError

    def base_forward(self, x: Tensor, initial: bool = False) -> Tensor:
        bias = getattr(self.base, "bias", None)
        state = self.state(initial)
        if not self.training and not torch.is_grad_enabled():
            return F.linear(x, eval_weight(self, self.dequantised, state), bias)
        if not any(t.requires_grad for t in state) or not torch.is_grad_enabled():
            return F.linear(x, self.dequantised(*state), bias)
        return recomputed_linear(x, bias, self.dequantised, *state)

    def train(self, mode: bool = True) -> PackedBase:
        self.__dict__.pop("eval_weight", None)  # training holds the packed form only
        return super().train(mode)

    def effective_weight(self, initial: bool = False) -> Tensor:
        return self.dequantised(*self.state(initial))

    def packed_bytes(self) -> int:
        """Bytes of the packed codes (the frozen base as this module holds it)."""
        return self.codes.numel() * self.codes.element_size()
