"""SoKA: SVD on Kronecker adaptation (Chong and Qu, "Singular Value Decomposition on Kronecker Adaptation for Large
Language Models", arXiv:2506.15251).

A target weight ``W (m x n)``, ``m = m1 m2``, ``n = n1 n2``, is written as a sum of Kronecker products found by the
Kronecker-product SVD (KPSVD; Van Loan and Pitsianis, "Approximation with Kronecker Products", 1993). The
rearrangement ``R(W)`` ``(m1 n1 x m2 n2)`` has one row per ``m2 x n2`` block of W,
``R[(i1, j1), (i2, j2)] = W[i1 m2 + i2, j1 n2 + j2]``, so that ``R(U (x) V) = vec(U) vec(V)^T``: a Kronecker sum is a
low-rank R, and the SVD ``R = sum_k sigma_k u_k v_k^T`` gives the nearest sums of Kronecker products,

    W = sum_k sigma_k U_k (x) V_k,    U_k = u_k as (m1 x n1),  V_k = v_k as (m2 x n2)     (the paper's Alg. 1)

with the truncation to the top r terms the best Kronecker-rank-r approximation in the Frobenius norm. The principal
r terms initialise the adapter, PiSSA-style, and train (``U_k``, ``V_k`` and ``sigma_k``); the rest of W is a frozen
residual. Non-destructive here: W stays untouched and the layer adds ``(K - K0) x`` where
``K = sum_k sigma_k U_k (x) V_k`` and ``K0`` is the same sum over the initial factors, kept as frozen persistent
buffers; at init the two identical computations cancel exactly, so the adapted model equals the base bit for bit.
``(U (x) V) x`` is computed without forming the product: with ``x`` as an ``(n1, n2)`` matrix X it is ``U X V^T``.

**Rank selection** (the paper's "spectrum-aware dynamic rank selection" by "energy-threshold and elbow-point
criteria"), per target on the KPSVD spectrum sigma_1 >= ... >= sigma_K (:func:`select_rank`):

* energy: the smallest r with ``sum_{k<=r} sigma_k^2 >= energy * sum_k sigma_k^2``;
* elbow: the k farthest from the straight line through ``(1, sigma_1)`` and ``(K, sigma_K)`` (the knee of the
  spectrum, the "Kneedle" construction; the first k on ties);
* r = min(energy rank, elbow, max_rank), at least 1: a component is kept only if both criteria keep it.

The ranks are decided when the adapter is applied and stored in the config (``ranks``: target key -> r), so that a
saved adapter rebuilds with the same shapes. Factor shapes: ``m1`` is the largest divisor of m at most sqrt(m),
``m2 = m / m1`` (the most balanced split; ``m1 = 1`` for a prime m, which makes the Kronecker sum a low-rank sum of
row blocks), the same for n. Parameters per target: ``r (m1 n1 + m2 n2 + 1)``; a 4096 x 4096 Llama-2-7B projection
has 64 x 64 factors, 8,193 per term.

Sources and choices. No code is public and only the abstract and summaries of the paper were available here: the
KPSVD itself is standard (and tested against a constructed sum of Kronecker products), but these are vpeft's
readings, named as such: the factor shapes (balanced), the exact energy and elbow formulas and their combination
(min), the defaults energy = 0.9 and max_rank = 8, q and v as targets (the paper reports 0.99M parameters on
Llama-2-7B, "25% fewer than LoRA/PiSSA", which fits a few 64 x 64 terms on each q and v), and trainable sigma next to
the factors (with unit-norm factors, as the SVD gives them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, NonNegativeInt, PositiveInt, ProperFraction, Target
from . import _svd
from .svfit import rank_of


@dataclass
class SoKAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    energy: ProperFraction = 0.9  # share of the KPSVD spectrum's energy the kept terms must reach
    max_rank: PositiveInt = 8  # at most this many Kronecker terms per target
    elbow: bool = True  # also stop at the knee of the spectrum
    ranks: tuple[tuple[str, NonNegativeInt], ...] = ()  # target key -> r; written when the adapter is applied


def split(size: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = size``, ``a`` the largest divisor of ``size`` at most its square root."""
    a = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return a, size // a


def rearrange(weight: Tensor, m1: int, n1: int) -> Tensor:
    """Van Loan's ``R(W)``: ``(m1 n1, m2 n2)``, row ``i1 n1 + j1`` the block ``W[i1 m2 :, j1 n2 :]`` flattened."""
    m, n = weight.shape
    m2, n2 = m // m1, n // n1
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kpsvd(weight: Tensor, m1: int, n1: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigma (K,), U (K, m1, n1), V (K, m2, n2))`` with ``weight = sum_k sigma_k kron(U_k, V_k)``, sigma
    descending, ``K = min(m1 n1, m2 n2)``; float32 through vpeft's shared SVD."""
    m, n = weight.shape
    u, s, v = _svd.svd(rearrange(weight, m1, n1))
    return s, u.T.reshape(-1, m1, n1), v.T.reshape(-1, m // m1, n // n1)


def select_rank(sigma: Tensor, energy: float, max_rank: int, elbow: bool = True) -> int:
    """The number of Kronecker terms to keep: ``min(energy rank, elbow, max_rank)``, at least 1 (see the module
    docstring)."""
    s = sigma.double()
    power = s**2
    cumulative = power.cumsum(0)
    r = int((cumulative < energy * cumulative[-1]).sum().item()) + 1
    if elbow and s.numel() > 2:
        k = torch.arange(1, s.numel() + 1, dtype=torch.float64)
        # distance of (k, s_k) from the chord through the first and last points (up to a constant factor)
        dk, ds = float(s.numel() - 1), float(s[-1] - s[0])
        distance = (ds * (k - 1) - dk * (s - s[0])).abs()
        r = min(r, int(distance.argmax().item()) + 1)
    return max(1, min(r, max_rank))


def kron_apply(x: Tensor, sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``sum_k sigma_k kron(U_k, V_k) x`` over the last dimension of x, without forming the Kronecker products."""
    K, m1, n1 = U.shape
    m2, n2 = V.shape[1:]
    X = x.reshape(*x.shape[:-1], n1, n2)
    t = torch.einsum("...bc,kdc->...kbd", X, V)  # X V_k^T: (..., K, n1, m2)
    y = torch.einsum("k,kab,...kbd->...ad", sigma, U, t)  # sum_k sigma_k U_k X V_k^T: (..., m1, m2)
    return y.reshape(*x.shape[:-1], m1 * m2)


class SoKA(AdapterModule):
    Config = SoKAConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: SoKAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        r = rank_of(config, target, "soka")
        (m1, _), (n1, _) = split(weight.shape[0]), split(weight.shape[1])
        sigma, U, V = kpsvd(weight, m1, n1)
        sigma, U, V = (t[:r].to(weight.dtype).contiguous() for t in (sigma, U, V))
        self.soka_sigma = nn.Parameter(sigma.clone())
        self.soka_U, self.soka_V = nn.Parameter(U.clone()), nn.Parameter(V.clone())
        self.register_buffer("sigma0", sigma, persistent=True)  # the initial terms; saved: the SVD is device-dependent
        self.register_buffer("U0", U, persistent=True)
        self.register_buffer("V0", V, persistent=True)

    @classmethod
    def prepare(cls, config: SoKAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> SoKAConfig:
        if config.ranks:
            return config
        ranks = []
        for t in targets:
            weight, _ = t.weight_and_bias()
            sigma = kpsvd(weight, split(weight.shape[0])[0], split(weight.shape[1])[0])[0]
            ranks.append((t.key, select_rank(sigma, config.energy, config.max_rank, config.elbow)))
        return replace(config, ranks=tuple(ranks))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        now = kron_apply(x, self.soka_sigma, self.soka_U, self.soka_V)
        return y + (now - kron_apply(x, self.sigma0, self.U0, self.V0))  # exactly zero at init

    def delta_weight(self) -> Tensor:
        def dense(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
            return sum(s * torch.kron(u, v) for s, u, v in zip(sigma, U, V, strict=True))

        return dense(self.soka_sigma, self.soka_U, self.soka_V) - dense(self.sigma0, self.U0, self.V0)
