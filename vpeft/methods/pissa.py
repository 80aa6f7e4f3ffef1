"""PiSSA: principal singular values and singular vectors adaptation (Meng, Wang and Zhang, "PiSSA: Principal
Singular Values and Singular Vectors Adaptation of Large Language Models", NeurIPS 2024, arXiv:2404.02948).

The SVD ``W = U S V^T`` of each target weight splits it into its principal part, which trains as a LoRA, and a frozen
residual (eq. 2-4 of the paper, with s = alpha / r as Hugging Face PEFT's ``init_lora_weights="pissa"`` applies it):

    A = diag(sqrt(S_r / s)) V_r^T  (r x in),    B = U_r diag(sqrt(S_r / s))  (out x r),    W_res = W - s B A

so ``s B A`` is the rank-r truncation of W and ``y = W_res x + s B A x`` equals ``W x`` at initialisation. The
residual is not written into the base weight: ``A0``, ``B0`` (the initial factors) are frozen buffers and the layer
computes ``W x + s (B A x - B0 A0 x)`` (``methods/_residual.py``), so the adapted model equals the base bit for bit at
init, ``disabled()`` is the base model and merge/unmerge are exact. Export to Hugging Face PEFT writes the rank-2r
LoRA ``[A; A0]``, ``[B, -B0]`` on the original weights, PEFT's own PiSSA-to-LoRA conversion.

Defaults: r = 8, alpha = 8 (s = 1, Hugging Face PEFT's defaults; the paper's LLaMA runs use r = 128 with alpha = r,
i.e. also s = 1), no dropout, and the paper's "all linear layers" as roles: q, k, v, attn_out, mlp_in, mlp_out
(Llama's ``mlp.gate_proj`` has no role: add it to ``targets`` to match the paper there). The SVD is the shared float32
helper ``methods/_svd.py`` (exact; on the CPU an eigendecomposition of the float64 Gram matrix), where PEFT calls
``torch.linalg.svd``: singular vectors may differ in sign, which PiSSA's ``B A`` and its training do not see (a sign
flip of one triplet flips a row of A and a column of B, and AdamW's updates flip with them). ``niter`` > 0 takes
PEFT's fast variant ``pissa_niter_<niter>`` instead: ``torch.svd_lowrank(W, q=r, niter=niter)``, randomised (seeded
with ``seed`` per target, so a rebuild is reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import NonNegativeInt, Prepared, Target
from . import _svd
from ._residual import ResidualConfig, ResidualLoRA, in_model_order


@dataclass
class PiSSAConfig(ResidualConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    niter: NonNegativeInt = 0  # 0: exact SVD; > 0: torch.svd_lowrank with that many subspace iterations
    seed: NonNegativeInt = 0  # of the randomised SVD (niter > 0), plus the target's index in model order


def principal_factors(weight: Tensor, r: int, scale: float, niter: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """PiSSA's ``(A0, B0)`` of one ``(out, in)`` weight: ``s B0 A0`` is its best rank-r approximation."""
    if niter == 0:
        U, S, V = _svd.svd(weight)
        U, S, V = U[:, :r], S[:r], V[:, :r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(weight.detach().float(), q=r, niter=niter)
    root = (S / scale).sqrt()
    return root[:, None] * V.T, U * root


class PiSSA(ResidualLoRA):
    Config = PiSSAConfig

    @classmethod
    def prepare(cls, config: PiSSAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> Prepared:
        scale = config.alpha / config.r
        per_target = {}
        for i, t in enumerate(in_model_order(model, targets)):
            weight, _ = t.weight_and_bias()
            per_target[t.key] = principal_factors(weight, config.r, scale, config.niter, config.seed + i)
        return Prepared(config, per_target)
