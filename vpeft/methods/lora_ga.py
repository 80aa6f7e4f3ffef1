"""LoRA-GA: low-rank adaptation with gradient approximation (Wang, Yu and Li, "LoRA-GA: Low-Rank Adaptation with
Gradient Approximation", NeurIPS 2024, arXiv:2407.05000; official code ``Outsider565/LoRA-GA``, reproduced by Hugging
Face PEFT's ``init_lora_weights="lora_ga"`` with ``LoraGAConfig``).

The full-weight gradient ``G = mean over calibration batches of dL/dW`` of each target is estimated first (the core's
:func:`~vpeft.core.weight_gradients`: one backward pass per item, model in train mode, each gradient folded into its
sum and freed at once). Its randomised SVD ``G ~ U S V^T`` (``torch.svd_lowrank(G, q=min(4r, min(out, in)),
niter=4)``, PEFT's call) gives factors whose first step follows the full fine-tuning gradient (sec. 3.2, eq. 8-9; the
``direction`` ``ArB2r``):

    A0 = V_{:, 1..r}^T,    B0 = U_{:, r+1..2r} diag(S_{r+1..2r}) * m^(1/4) / sqrt(gamma)    (scale "stable", sec. 3.3)

with m = out and gamma = ``stable_gamma``; ``ArBr`` (A the odd, B the even indices), ``A2rBr`` (A r+1..2r, B 1..r)
and ``random`` (r of the first 2r, one permutation for both) are PEFT's other directions, ``weight_svd`` (B0 times
the weight's top singular value over S_B's first), ``gd_scale`` (A0, B0 over s) and ``unit`` its other scales. The
piece ``s B0 A0`` (s = alpha / r) is taken from W as a frozen residual: ``A0``, ``B0`` are buffers and the base
weight stays untouched (``methods/_residual.py``), so the model at init is the base model exactly, where the
reference writes ``W - s B0 A0`` into the base weight. Export to Hugging Face PEFT: the rank-2r LoRA ``[A; A0]``,
``[B, -B0]`` on the original weights.

The randomised SVD draws from torch's global generator; here each target's draw is seeded with ``seed`` plus the
target's index in model order (inside ``torch.random.fork_rng``, so the caller's generator does not move), which
makes an apply reproducible and lets a test seed PEFT's ``lora_ga_init`` the same way: singular-vector signs matter
here, because A0 and B0 take different triplets. ``calibration_cache`` (a directory) keeps the gradients as
safetensors keyed by model weights, data and options, so a sweep over r, direction or scale estimates them once.

Defaults: r = 8, alpha = 16 (the paper's setting), direction ArB2r, scale stable, gamma = 16, no dropout, q and v
(PEFT's default targets for Llama; the paper adapts all linear layers), 16 calibration items (the engine's
``data.calibration_batches`` default; the paper uses 64 samples). Departures: the stable scale's m is the output
width on every layer (PEFT takes ``weight.shape[0]``, the input width of a GPT-2 Conv1D); the gradient of each fused
slice (GPT-2 ``c_attn[q]``) is its rows of the fused weight's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core import (
    FiniteFloat,
    NonNegativeInt,
    PositiveInt,
    Prepared,
    Target,
    cached,
    fused_parts,
    is_conv1d,
    weight_gradients,
)
from ._residual import ResidualConfig, ResidualLoRA, in_model_order


@dataclass
class LoRAGAConfig(ResidualConfig):
    alpha: FiniteFloat = 16.0  # the paper's setting with r = 8
    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = "ArB2r"
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = "stable"
    stable_gamma: PositiveInt = 16
    calibration_batches: PositiveInt = 16
    seed: NonNegativeInt = 0  # of each target's randomised SVD (plus its position)
    calibration_cache: str | None = None  # directory of cached gradients (safetensors); None: no cache


def estimate_gradients(
    model: nn.Module, targets: list[Target], calibration: Any, config: LoRAGAConfig
) -> dict[str, Tensor]:
    """``{target key: G (out, in)}``, the mean gradient of each target weight over the calibration items."""
    params = {t.name: t.module.weight for t in targets}  # once per module: fused slices share it

    def compute() -> dict[str, Tensor]:
        sums, used = weight_gradients(model, params, calibration, config.calibration_batches, "lora_ga")
        return {name: g.div_(used) for name, g in sums.items()}  # in place: no second copy of the totals

    options = {"limit": config.calibration_batches, "mean": True}
    grads = cached(config.calibration_cache, "weight_gradients", options, model, calibration, compute)
    out = {}
    for t in targets:
        g = grads[t.name].to(t.module.weight.device)
        g = g.T if is_conv1d(t.module) else g  # (out, in)
        out[t.key] = g[fused_parts(t.module)[t.part]] if t.part in ("q", "k", "v") else g
    return out


def ga_factors(grad: Tensor, weight: Tensor, config: LoRAGAConfig, seed: int) -> tuple[Tensor, Tensor]:
    """LoRA-GA's ``(A0 (r, in), B0 (out, r))`` of one target from its gradient estimate (PEFT's ``lora_ga_init``)."""
    r, s = config.r, config.alpha / config.r
    with torch.random.fork_rng(devices=[grad.device] if grad.device.type == "cuda" else []):
        torch.manual_seed(seed)
        grad = grad.float()
        U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
        Vh = V.T
        U, S, Vh = U[:, : 2 * r], S[: 2 * r], Vh[: 2 * r]
        if config.direction == "ArBr":
            a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        elif config.direction == "A2rBr":
            a_idx, b_idx = slice(r, 2 * r), slice(0, r)
        elif config.direction == "ArB2r":
            a_idx, b_idx = slice(0, r), slice(r, 2 * r)
        else:  # random: the same r of the first 2r for both
            a_idx = b_idx = torch.randperm(2 * r)[:r]
        A, S_B = Vh[a_idx], S[b_idx]
        B = U[:, b_idx] @ torch.diag(S_B)
        if config.scale == "stable":
            B = B * (grad.shape[0] ** 0.25 / config.stable_gamma**0.5)
        elif config.scale == "weight_svd":
            _, weight_s, _ = torch.svd_lowrank(weight.detach().float(), q=r, niter=4)
            if S_B[0] > 0:
                B = B * (weight_s[0] / S_B[0])
        elif config.scale == "gd_scale":
            A, B = A / s, B / s
    return A, B


class LoRAGA(ResidualLoRA):
    Config = LoRAGAConfig
    needs_calibration = True

    @classmethod
    def prepare(cls, config: LoRAGAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> Prepared:
        grads = estimate_gradients(model, targets, calibration, config)
        per_target = {}
        for i, t in enumerate(in_model_order(model, targets)):
            weight, _ = t.weight_and_bias()
            per_target[t.key] = ga_factors(grads.pop(t.key), weight, config, config.seed + i)
        return Prepared(config, per_target)
