"""CorDA: context-oriented decomposition adaptation (Yang, Li, Li, Zhou, Wang, Xu and Tao, "CorDA: Context-Oriented
Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024,
arXiv:2406.05223; official code ``iboing/CorDA``, reproduced by Hugging Face PEFT's ``init_lora_weights="corda"``).

From calibration data, the covariance of each target's input, ``C = mean over batches of X^T X`` (eq. 2; each batch's
``X`` divided by its largest value, as the official ``act_aware_utils.py`` and PEFT do), orients the SVD of the weight
toward the context (eq. 3-4):

    W C = U S V^T,    W = U S (V^T C^{-1}) = U S V_hat^T      (C damped: C + d mean(diag C) I, d = 0.01, doubled
                                                               until ||(C + ...) (C + ...)^{-1} - I|| < 0.05)

and r triplets become the adapter, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_hat_r^T``, the rest the frozen
residual ``W - s B A`` (s = alpha / r). ``mode="ipm"`` (instruction-previewed: calibrate on the fine-tuning task)
takes the r largest triplets; ``mode="kpm"`` (knowledge-preserved: calibrate on the knowledge to keep, e.g.
question answering) the r smallest, so the largest stay frozen. As PiSSA here, the residual is never written into the
base weight: ``A0``, ``B0`` are frozen buffers (``methods/_residual.py``), so the output at init is the base's
exactly, ``disabled()`` is the base model and the export to Hugging Face PEFT is the rank-2r LoRA
``[A; A0]``, ``[B, -B0]`` on the original weights.

Calibration is the core's :func:`~vpeft.core.input_covariance` (forward hooks, float64 accumulation) over at most
``calibration_batches`` items; with ``calibration_cache`` (a directory) the covariances are stored as safetensors
keyed by the target weights, the data and the options, so a sweep over r or mode computes them once. The damped
inverse and the SVD are float32 ``torch.linalg.inv`` / ``torch.linalg.svd``, PEFT's calls, so both libraries pick the
same triplets (the minor ones of kpm are the least stable to another algorithm).

Defaults: r = 8, alpha = 8 (PEFT's; the paper's LLaMA-2 runs use r = 128, alpha = r), no dropout, mode ipm, the
paper's "all linear layers" as roles (q, k, v, attn_out, mlp_in, mlp_out; Llama's ``mlp.gate_proj`` has no role),
256 calibration items (the paper's 256 samples; the engine passes ``data.calibration_batches``). Departures: the
covariance sums in float64 (PEFT: float32; the official code float64 too); any batch size works (PEFT's hook takes
one sequence per call), each call's ``X`` being all its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core import PositiveInt, Prepared, Target, cached, input_covariance
from ._residual import ResidualConfig, ResidualLoRA


@dataclass
class CorDAConfig(ResidualConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    mode: Literal["ipm", "kpm"] = "ipm"  # ipm: the r largest triplets train; kpm: the r smallest
    calibration_batches: PositiveInt = 256
    calibration_cache: str | None = None  # directory of cached covariances (safetensors); None: no cache


def damped_inverse(cov: Tensor) -> tuple[Tensor, Tensor]:
    """``(C + d mean(diag C) I, its inverse)``, d = 0.01 doubled until the inverse is accurate (official rule)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + eye * cov.diagonal().mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damp *= 2


def corda_factors(weight: Tensor, cov: Tensor, r: int, scale: float, mode: str) -> tuple[Tensor, Tensor]:
    """CorDA's ``(A0 (r, in), B0 (out, r))`` of one ``(out, in)`` weight given its input covariance ``(in, in)``."""
    fixed, inv = damped_inverse(cov.float())
    U, S, Vh = torch.linalg.svd(weight.detach().float() @ fixed, full_matrices=False)
    V_hat = (Vh @ inv).T  # (in, k): W = U S V_hat^T
    keep = slice(0, r) if mode == "ipm" else slice(-r, None)
    U, S, V_hat = U[:, keep], S[keep] / scale, V_hat[:, keep]
    return V_hat.T * S.sqrt()[:, None], U * S.sqrt()


class CorDA(ResidualLoRA):
    Config = CorDAConfig
    needs_calibration = True

    @classmethod
    def prepare(cls, config: CorDAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> Prepared:
        modules = {t.name: t.module for t in targets}  # the slices of a fused projection share their input
        options = {"limit": config.calibration_batches, "scale": "max"}

        def compute() -> dict[str, Tensor]:
            return input_covariance(model, modules, calibration, config.calibration_batches, "corda", scale="max")

        covariances = cached(config.calibration_cache, "input_covariance", options, model, calibration, compute)
        scale = config.alpha / config.r
        per_target = {}
        for t in targets:
            weight, _ = t.weight_and_bias()
            cov = covariances[t.name].to(weight.device)
            per_target[t.key] = corda_factors(weight, cov, config.r, scale, config.mode)
        return Prepared(config, per_target)
