"""SoMA: singular-value-decomposed minor components adaptation (Yun, Chae, Lee and Ro, "SoMA: Singular Value
Decomposed Minor Components Adaptation for Domain Generalizable Representation Learning", CVPR 2025,
arXiv:2412.04077; the official code ``ysj9909/SoMA`` calls it SoRA).

For each target weight, the float32 SVD ``W = U S V^T`` is taken when the adapter is built (on the loaded weights)
and its last r triplets ``(U_m, S_m, V_m)`` (the minor components) initialise a LoRA, PiSSA-style, with s = alpha / r:

    A = diag(sqrt(S_m / s)) V_m^T  (r x in),    B = U_m diag(sqrt(S_m / s))  (out x r),    W_res = W - s B0 A0
    y = W_res x + (b + delta_b) + s B A x = W x + b + delta_b + s (B A - B0 A0) x

A0, B0 (the initial A, B) are frozen persistent buffers, so W_res is never stored as a matrix and the base weight
stays untouched (disable, unmerge); at init ``B A - B0 A0`` is exactly zero, so the adapted model and the merged
weight equal the original bit for bit. As in the official ``mark_only_lora_as_trainable(bias="all")`` the biases of
the targets train (here as a zero-initialised ``delta_b``; ``train_bias=False`` turns that off).

Defaults (``configs/sora/*.py``): targets q, k, v, proj, fc1, fc2 (the official converter splits qkv, so q, k, v
are separate slices here), r = 16, alpha = 16. Blocks below ``start_block`` are frozen ("domain-generalizable
blocks"): the official value is 8 of DINOv2-L's 24 blocks, i.e. the first third; ``start_block=None`` resolves to
``ceil(depth / 3)`` (4 of ViT-B's 12 blocks; depth = 1 + the largest block index among the targets) when the adapter
is applied, and the resolved value is stored in the config. Annealed weight decay (``on_step``): the param groups that
hold this adapter's parameters follow a cosine from ``weight_decay`` (0.05) at step 0 to ``weight_decay_min`` (1e-5)
at the last step, the official ``CosineAnnealingParamScheduler(eta_min=1e-5)`` over AdamW's 0.05; groups created
with weight decay 0 (biases, norms) stay at 0. ``weight_decay=None`` starts from the group's own initial value.

ViT-B/16 count, blocks 4..11: 8 * (4 * 16 * (768 + 768) + 2 * 16 * (768 + 3072)) = 8 * 221,184 = 1,769,472 A/B
parameters plus 8 * (4 * 768 + 3072 + 768) = 55,296 biases: 1,824,768. Mergeable: ``s (B A - B0 A0)`` and ``delta_b``.

Where this follows the paper against the official code: the official ``SoraModel`` takes the SVD before mmengine
loads the pretrained checkpoint, which then overwrites W_res with the full pretrained W while A, B keep minor
components of the random init; here the SVD is of the loaded weight. The official default ``sora_niter_4`` init
(top components via ``svd_lowrank``) is not offered; every released config uses the full SVD, as here. The unused
``lora_dropout`` is left out. The official scheduler also raises zero-decay groups toward 1e-5; here they stay at 0.

Departure kept on purpose: the official optimiser (``PEFTOptimWrapperConstructor``) gives the tuned biases the
backbone's annealed weight decay 0.05, because its ``custom_keys={"backbone": ...}`` match wins over every other
rule and the configs set no ``bias_decay_mult`` (their comment asks for no decay on position embeddings and norms
only). Here ``delta_b`` stays in the engine's no-decay group of 1-D tensors: it is a zero-initialised change on top of
the frozen pretrained bias, so decay on it would pull the bias toward its pretrained value, whereas the official
decay pulls the bias itself toward zero. Giving ``delta_b`` 0.05 would copy the number, not the behaviour, and the
official behaviour (decay of b + delta_b) is not something an optimiser param group can express.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, FiniteFloat, MethodConfig, NonNegativeFloat, NonNegativeInt, Rank, Target
from . import _svd

INITIAL_WD = "soma_initial_weight_decay"  # key this method adds to an optimizer param group


@dataclass
class SoMAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    r: Rank = 16
    alpha: FiniteFloat = 16.0  # s = alpha / r
    start_block: NonNegativeInt | None = None  # blocks below are frozen; None: ceil(depth / 3), resolved when applied
    train_bias: bool = True
    anneal_weight_decay: bool = True
    weight_decay: NonNegativeFloat | None = 0.05  # start of the cosine; None: the param group's own initial value
    weight_decay_min: NonNegativeFloat = 1e-5


class SoMA(AdapterModule):
    Config = SoMAConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: SoMAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        base, r = target.module, config.r
        weight, _ = target.weight_and_bias()  # (out, in)
        if r > min(weight.shape):
            raise ValueError(f"soma option r={r} exceeds the rank bound {min(weight.shape)} of {target.key!r}.")
        self.scale = config.alpha / r
        U, S, V = _svd.svd(weight)
        root = (S[-r:] / self.scale).sqrt()  # minor components, in descending order
        A = (root[:, None] * V[:, -r:].T).to(weight.dtype)  # (r, in)
        B = (U[:, -r:] * root).to(weight.dtype)  # (out, r)
        self.lora_A, self.lora_B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.register_buffer("A0", A, persistent=True)  # W_res = W - s B0 A0; saved: the SVD is device-dependent
        self.register_buffer("B0", B, persistent=True)
        has_bias = getattr(base, "bias", None) is not None and config.train_bias
        self.bias_delta = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype)) if has_bias else None

    @classmethod
    def accepts(cls, target: Target, config: SoMAConfig) -> bool:
        """targets in blocks from start_block on (all blocks when it is None)."""
        return config.start_block is None or (target.index is not None and target.index >= config.start_block)

    @classmethod
    def prepare(cls, config: SoMAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> SoMAConfig:
        if config.start_block is not None:
            return config
        depth = 1 + max((t.index for t in targets if t.index is not None), default=-1)
        return replace(config, start_block=math.ceil(depth / 3))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        # s (B A x - B0 A0 x): two identical computations, so exactly zero while B, A equal B0, A0
        low = F.linear(F.linear(x, self.lora_A), self.lora_B) - F.linear(F.linear(x, self.A0), self.B0)
        y = y + self.scale * low
        return y + self.bias_delta if self.bias_delta is not None else y

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A - self.B0 @ self.A0)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        weight = weight + self.delta_weight().to(weight.dtype)
        return weight, (bias + self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias)

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        weight = weight - self.delta_weight().to(weight.dtype)
        return weight, (bias - self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias)

    @classmethod
    def on_step(
        cls, config: SoMAConfig, layers: list[AdapterModule], step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        """Cosine-anneal the weight decay of the param groups holding this adapter's parameters."""
        if optimizer is None or not config.anneal_weight_decay:
            return
        mine = {id(p) for layer in layers for p in layer.parameters()}
        t = min(step / max(1, total_steps - 1), 1.0)
        for group in optimizer.param_groups:
            if not any(id(p) in mine for p in group["params"]):
                continue
            start = group.setdefault(INITIAL_WD, group.get("weight_decay", 0.0))
            if start == 0:
                continue  # groups without decay (biases, norms) keep none
            top = start if config.weight_decay is None else config.weight_decay
            low = config.weight_decay_min
            group["weight_decay"] = low + (top - low) * 0.5 * (1 + math.cos(math.pi * t))
