"""KaSA: knowledge-aware singular-value adaptation (Wang, Jiang, Li et al., "KaSA: Knowledge-Aware Singular-Value
Adaptation of Large Language Models", ICLR 2025, arXiv:2412.06071; official code ``juyongjiang/KaSA``, and HF PEFT's
``LoraConfig(kasa_config=KasaConfig(...))``, which this module reproduces).

Two changes to LoRA (the paper's method section; equation numbers as PEFT's ``KasaConfig`` cites them):

1. **Knowledge-based truncation of the base, on purpose.** The float32 SVD ``W = U S V^T`` of each target weight
   (``k = min(out, in)`` triplets) is taken when the adapter is built, and its r *smallest* triplets (the paper's
   "noisy, long-tail knowledge") are dropped: the adapted layer computes with ``W_trunc = W - U_d S_d V_d^T``, the
   best rank-(k - r) approximation of W. This is part of the method, so the adapted model does **not** equal the
   base at initialisation (``identity_at_init = False``). Measured on SmolLM2-135M-Instruct at r = 8 on q and v
   (``V-PEFT-Bench/perf/kasa_truncation.py``, this 2-core CPU): the dropped piece is 0.02% to 11% (median 0.6%) of
   a weight's Frobenius norm, the narrow 192 x 576 v projections losing most, and the language-model loss of two
   plain sentences rises from 2.98 to 8.14 before any training (HF PEFT's KaSA: 8.14 as well); training has to
   recover that. ``tests/methods/test_kasa.py`` checks the truncated layer against a float64 SVD.
2. **Singular-value adaptation.** ``y = W_trunc x + s B diag(d) A x`` with ``A (r, in)`` Kaiming-uniform,
   ``B (out, r)`` zeros, ``d (r,)`` ~ N(0, 1) (``lora_diag``, "Delta Sigma") and ``s = alpha / r``.

Training adds the regulariser (paper Eq. 9-11, as PEFT cites them) as the method's loss (``loss``):

    beta * sum_l ||d_l||^2 + gamma * sum_l (||B_l^T B_l - I_r||_F + ||A_l A_l^T - I_r||_F)

summed over the targets, as PEFT's ``LoraModel._get_kasa_loss()``.

Non-destructive here (where PEFT and the official code overwrite the base weight): W stays untouched and the dropped
piece is carried as two frozen persistent buffers ``U_d S_d`` (out, r) and ``V_d^T`` (r, in), subtracted in the
forward. ``vpeft.disabled(model)`` is therefore the original model exactly, unmerge restores W (to float rounding),
and other adapters on the same model see the original weight. The buffers are saved with the adapter, so a reload on
another device (whose SVD may differ in the last bits) computes the same model. Merge folds
``- U_d S_d V_d^T + s B diag(d) A`` into W.

Defaults: the official GLUE runs (``README.md`` and ``logs/``): r = 8, alpha = 16, dropout 0, q and v (PEFT's
default targets for RoBERTa/DeBERTa), beta = 1e-4, gamma = 1e-3 (PEFT's ``KasaConfig`` defaults, the official SST-2
and RTE values; other tasks tune them). ViT-B/16 count at r = 8 on q, v: 24 * (8 * (768 + 768) + 8) = 295,104.

Departures. From the official ``main.py::loss_fn``: it divides the regulariser by the number of layers and forms the
Gram matrices as ``A^T A`` (in x in) and ``B B^T`` (out x out) against an identity of that size; this follows PEFT
(``r x r`` Grams, summed over layers), which matches the paper's ``Delta U^T Delta U`` and ``Delta V^T Delta V``.
Against PEFT: its SVD is ``torch.linalg.svd``, here vpeft's shared ``_svd.svd`` (float64 Gram route on the CPU); the
dropped piece agrees to float32 rounding and the signs of singular vectors do not enter it. PEFT refuses GPT-2's
``Conv1D`` (``fan_in_fan_out``); here it is a Linear like any other, since W is never rewritten. PEFT requires
r < min(out, in) (one component must stay), as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, NonNegativeFloat, Rank, Target
from . import _svd
from ._blocks import dropout


@dataclass
class KaSAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: Rank = 8
    alpha: FiniteFloat = 16.0  # s = alpha / r
    dropout: DropProbability = 0.0
    beta: NonNegativeFloat = 1e-4  # weight of sum ||d||^2
    gamma: NonNegativeFloat = 1e-3  # weight of the orthogonality terms


class KaSA(AdapterModule):
    Config = KaSAConfig
    wraps = ("linear",)
    mergeable = True
    identity_at_init = False  # the r smallest singular components of W are dropped on purpose

    def __init__(self, target: Target, config: KaSAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        r = config.r
        weight, _ = target.weight_and_bias()  # (out, in)
        k = min(weight.shape)
        if r >= k:
            raise ValueError(
                f"kasa option r={r} must be below min(out, in)={k} of {target.key!r}: KaSA drops the r smallest "
                f"singular components of the weight and at least one must stay (r <= {k - 1})."
            )
        self.scale = config.alpha / r
        self.dropout = dropout(config.dropout)
        U, S, V = _svd.svd(weight)
        self.register_buffer("dropped_us", (U[:, -r:] * S[-r:]).to(weight.dtype), persistent=True)  # (out, r)
        self.register_buffer("dropped_vh", V[:, -r:].T.contiguous().to(weight.dtype), persistent=True)  # (r, in)
        self.lora_A = nn.Parameter(torch.empty(r, weight.shape[1], dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, dtype=weight.dtype))
        self.lora_diag = nn.Parameter(torch.randn(r).to(weight.dtype))  # PEFT and the official code: randn
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        dropped = F.linear(F.linear(x, self.dropped_vh), self.dropped_us)  # U_d S_d V_d^T x: the truncation
        update = F.linear(F.linear(self.dropout(x), self.lora_A) * self.lora_diag, self.lora_B)
        return y - dropped + self.scale * update

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B * self.lora_diag) @ self.lora_A - self.dropped_us @ self.dropped_vh

    @classmethod
    def loss(cls, config: KaSAConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        """``beta * sum ||d||^2 + gamma * sum (||B^T B - I||_F + ||A A^T - I||_F)`` over the targets, in float32."""
        if not layers or (config.beta == 0 and config.gamma == 0):
            return None
        total = 0.0
        for layer in layers:
            a, b, d = layer.lora_A.float(), layer.lora_B.float(), layer.lora_diag.float()
            eye = torch.eye(d.shape[0], device=d.device)
            ortho = torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)
            total = total + config.beta * (d**2).sum() + config.gamma * ortho
        return total
