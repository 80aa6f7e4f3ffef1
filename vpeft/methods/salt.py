"""SALT: singular value adaptation with low-rank transformation (Elsayed, Hashmi, Elseiagy, Wang, Yaqub and
Almakky, "SALT: Singular Value Adaptation with Low-Rank Transformation", arXiv:2503.16055; BMVC 2025 per the
official README; code ``BioMedIA-MBZUAI/SALT``).

With the float32 SVD ``W = U S V^T`` of the loaded weight (taken when the adapter is built), the top r singular
values get a trainable scale a and shift beta, and the remaining k - r a low-rank update X Y inside their own
singular subspace:

    S' = [[diag(a * s_top + beta), 0], [0, diag(s_tail) + X Y]],    W' = U ReLU(S') V^T,    y = W' x + b

with ReLU element-wise on the whole k x k matrix (``relu="diag"`` clamps only its diagonal). Here W' is applied as
``W + delta W`` with ``delta W = U_top diag(ReLU(a s + beta) - s) V_top^T + U_tail (ReLU(diag(s_tail) + X Y) -
diag(s_tail)) V_tail^T``, which is exactly zero at init (a = 1, beta = 0, Y = 0) and keeps the SVD's rounding out
of the output. ``delta W`` is rebuilt in every training forward (O(d^3)); outside training, or without autograd,
it is cached and reused until a parameter or buffer changes (version counters) or the mode switches; merge folds
the same ``delta W`` into W. Optional regulariser (``loss``): ``reg_weight * sum ||diag(a s + beta) - diag(s)||_F +
||X Y||_F``, off by default as in the released ``SALT_config.yml`` (``reg_multiplier: 0``).

Defaults, from the released SAM2 path (the SAM1 encoder's SALT lines are all commented out in the official code):
every block's fused qkv (one SVD of the 3d x d matrix, as the official), proj, fc1 and fc2 (timm ``samvit`` names;
``mlp.lin1``/``lin2`` of segment_anything via ``targets``), ``ratio = 0.1`` (r = max(1, floor(0.1 k))), ``r_lora =
256``, X Kaiming-uniform (a = sqrt(20), fan_in, relu gain) and Y = 0, so W' = W at init. ``init="sam1"`` is the
SAM1 file's X, Y ~ N(0, 0.01^2) (not the base model at init). ``rank`` sets r absolutely (the SAM1 comments use
760 on qkv/proj, 50 on the MLP). Count per layer ``2 r + 2 (k - r) r_lora``; ViT-B/16 and SAM ViT-B (k = 768 on
all four, r = 76): 48 * (152 + 2 * 692 * 256) = 17,013,888. U, S, V are persistent buffers (an SVD on another device
may return other signs, which change X Y's meaning), so the adapter file holds about one copy of the targeted
weights. Mergeable. Not done: the official per-layer ``torch.manual_seed(42)`` and the (reg) tuple returned by
every rewritten block; trained norms and ``pos_embed`` (the official ``salt`` strategy) are other methods' job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import AdapterModule, LenientRank, MethodConfig, NonNegativeFloat, ProperFraction, Rank, Target
from . import _svd


@dataclass
class SALTConfig(MethodConfig):
    targets: tuple[str, ...] = ("qkv", "attn_out", "mlp_in", "mlp_out")
    ratio: ProperFraction = 0.1  # r = max(1, floor(ratio * k)) top singular values get scale and shift
    rank: Rank | None = None  # r as an absolute count (overrides ratio)
    r_lora: LenientRank = 256  # rank of X Y in the tail; the released SAM2 file uses 256 on every layer
    relu: Literal["elementwise", "diag"] = "elementwise"
    init: Literal["identity", "sam1"] = "identity"  # identity (SAM2 file) | sam1
    reg_weight: NonNegativeFloat = 0.0


class SALT(AdapterModule):
    Config = SALTConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: SALTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        k = min(weight.shape)
        r = config.rank if config.rank is not None else max(1, math.floor(config.ratio * k))
        if r >= k:
            raise ValueError(f"salt: r={r} top singular values leave no tail in {target.key!r} (k = {k}).")
        self.r, self.elementwise = r, config.relu == "elementwise"
        U, S, V = _svd.svd(weight)
        self.register_buffer("U", U, persistent=True)  # (out, k)
        self.register_buffer("S", S, persistent=True)  # (k,)
        self.register_buffer("V", V, persistent=True)  # (in, k)
        self.trainable_scale = nn.Parameter(torch.ones(r))  # a
        self.trainable_shift = nn.Parameter(torch.zeros(r))  # beta
        self.lora_X = nn.Parameter(torch.empty(k - r, config.r_lora))  # ((k - r), r_lora)
        self.lora_Y = nn.Parameter(torch.zeros(config.r_lora, k - r))  # (r_lora, (k - r))
        if config.init == "identity":
            nn.init.kaiming_uniform_(self.lora_X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
        else:
            nn.init.normal_(self.lora_X, std=0.01)
            nn.init.normal_(self.lora_Y, std=0.01)
        self._cache: tuple[tuple, Tensor] | None = None

    def build_delta(self) -> Tensor:
        """``W' - W`` (out x in), rebuilt from the parameters."""
        r, S = self.r, self.S
        top = torch.relu(self.trainable_scale * S[:r] + self.trainable_shift) - S[:r]  # (r,)
        tail = torch.diag(S[r:]) + self.lora_X @ self.lora_Y  # (k - r, k - r)
        if self.elementwise:
            tail = torch.relu(tail)
        else:
            d = tail.diagonal()
            tail = tail + torch.diag(torch.relu(d) - d)
        tail = tail - torch.diag(S[r:])
        U, V = self.U, self.V
        # multi_dot picks the cheaper order: U (tail V^T) when out > in (qkv, fc1), (U tail) V^T otherwise
        return (U[:, :r] * top) @ V[:, :r].T + torch.linalg.multi_dot([U[:, r:], tail, V[:, r:].T])

    def delta(self) -> Tensor:
        """The cached ``W' - W`` outside training when no gradient is wanted, else a fresh rebuild."""
        tensors = [*self.parameters(), *self.buffers()]
        if self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            self._cache = None
            return self.build_delta()
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.build_delta())
        return self._cache[1]

    def train(self, mode: bool = True) -> SALT:
        self._cache = None
        return super().train(mode)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + x @ self.delta().to(x.dtype).T

    def delta_weight(self) -> Tensor:
        return self.delta()

    @classmethod
    def loss(cls, config: SALTConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        if config.reg_weight == 0 or not layers:
            return None
        total = 0.0
        for layer in layers:
            s = layer.S[: layer.r]
            total = total + torch.linalg.vector_norm(layer.trainable_scale * s + layer.trainable_shift - s)
            total = total + torch.linalg.matrix_norm(layer.lora_X @ layer.lora_Y)
        return config.reg_weight * total
