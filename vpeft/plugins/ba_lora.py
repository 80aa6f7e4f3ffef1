"""``ba_lora``: BA-LoRA's three regularisers, a plug-in beside the adapter (with ``pissa`` it is BA-LoRA proper).

Paper: "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language
Models" (Chang et al., arXiv 2408.04556); code ``cyp-jlu-ai/BA-LoRA`` (``train.py``, ``CustomTrainer.compute_loss``).
The fine-tuned model's logits ``z`` and the frozen pre-trained model's ``z_ref`` on the same batch give

    L = L_task + lambda_cons * L_cons + lambda_div * L_div + lambda_svd * L_svd

* generation (logits ``(batch, tokens, vocabulary)``), paper eqs. 5-7:
  ``L_cons = KL(p_ref || p)`` per token, averaged over tokens; ``L_div = -H(p)``, the mean token entropy negated
  (diversity is maximised); ``L_svd = -sum_{i<=k} s_i / sum_i s_i`` over the singular values ``s`` of the
  ``(tokens, vocabulary)`` logit matrix (spectral energy kept in the top ``k`` directions);
* understanding (logits ``(batch, classes)``), paper eqs. 2-4: ``L_cons = mean((z/||z|| - z_ref/||z_ref||)^2)``
  (rows L2-normalised); ``L_div = ||C - diag(C)||_F^2 / d``, ``C`` the ``d x d`` covariance of ``z`` over the batch
  (decorrelated outputs); ``L_svd`` as above on the ``(batch, classes)`` matrix.

``mode: auto`` picks by the logits' rank (2: understanding, 3: generation). Headline defaults: lambdas
``(1e-4, 3e-4, 1e-4)`` and ``k = 10`` (the code's), PiSSA initialisation (choose ``method.name: pissa``).

The frozen reference is the adapted model itself with its adapter disabled (``vpeft.disabled``), run again on the
step's inputs (:meth:`vpeft.core.LossContext.rerun`), without gradient and in evaluation mode (a separately loaded
reference model has no dropout either); no second copy of the weights is made.

Departures: the KL is averaged per token (the code's ``batchmean`` divides the sum by the batch only, so its scale
grows with the sequence length); the singular values are exact (``torch.linalg.svdvals``), not a randomised
estimate; the generation terms use every position the step's logits cover (the answer span for ``causal_lm``, whose
loss keeps only those logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import LossContext, MethodConfig, NonNegativeFloat, Plugin, PositiveInt, disabled
from ..errors import ConfigError


@dataclass
class BALoRAConfig(MethodConfig):
    consistency: NonNegativeFloat = 1e-4
    diversity: NonNegativeFloat = 3e-4
    svd: NonNegativeFloat = 1e-4
    k: PositiveInt = 10  # top singular values whose share of the spectrum L_svd raises
    mode: Literal["auto", "understanding", "generation"] = "auto"


def consistency_nlu(logits: Tensor, reference: Tensor) -> Tensor:
    """Mean squared difference of the row-normalised logits."""
    return (F.normalize(logits.float(), dim=-1) - F.normalize(reference.float(), dim=-1)).pow(2).mean()


def diversity_nlu(logits: Tensor) -> Tensor:
    """``||C - diag(C)||_F^2 / d`` of the batch covariance ``C`` of the ``(batch, d)`` logits."""
    z = logits.float()
    centred = z - z.mean(0, keepdim=True)
    cov = centred.T @ centred / max(z.shape[0] - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / z.shape[1]


def consistency_nlg(logits: Tensor, reference: Tensor) -> Tensor:
    """``KL(p_ref || p)`` per position, averaged over positions."""
    log_p = F.log_softmax(logits.float(), -1).flatten(0, -2)
    log_ref = F.log_softmax(reference.float(), -1).flatten(0, -2)
    return (log_ref.exp() * (log_ref - log_p)).sum(-1).mean()


def diversity_nlg(logits: Tensor) -> Tensor:
    """The mean entropy of the token distributions, negated."""
    log_p = F.log_softmax(logits.float(), -1)
    return (log_p.exp() * log_p).sum(-1).mean()


def svd_share(logits: Tensor, k: int) -> Tensor:
    """``-sum_{i<=k} s_i / sum_i s_i`` of the logits as a ``(rows, last dim)`` matrix."""
    s = torch.linalg.svdvals(logits.float().flatten(0, -2))
    return -s[:k].sum() / s.sum().clamp(min=1e-12)


class BALoRA(Plugin):
    Config = BALoRAConfig

    def __init__(self, model: nn.Module, config: BALoRAConfig):
        super().__init__(model, config)
        try:
            with disabled(model):
                pass
        except ValueError as err:
            raise ConfigError(
                f"ba_lora needs the pre-trained model as its reference, which it runs by disabling the adapter: {err} "
                "Use a method that leaves the base weights as they are (lora, pissa...)."
            ) from None

    def loss(self, context: LossContext) -> Tensor | None:
        cfg = self.config
        if context is None or context.outputs is None or cfg.consistency == cfg.diversity == cfg.svd == 0:
            return None
        logits = context.logits
        mode = cfg.mode if cfg.mode != "auto" else ("understanding" if logits.dim() == 2 else "generation")
        total = logits.new_zeros((), dtype=torch.float32)
        if cfg.consistency:
            reference = self.reference(context)
            term = consistency_nlu if mode == "understanding" else consistency_nlg
            total = total + cfg.consistency * term(logits, reference)
        if cfg.diversity:
            total = total + cfg.diversity * (diversity_nlu if mode == "understanding" else diversity_nlg)(logits)
        if cfg.svd:
            total = total + cfg.svd * svd_share(logits, cfg.k)
        return total

    @staticmethod
    def reference(context: LossContext) -> Tensor:
        """The base model's logits on the step's inputs: the same model, adapter disabled, no dropout, no grad."""
        model = context.model
        modes = {m: m.training for m in model.modules()}  # each module's own mode comes back (frozen norms...)
        model.eval()
        try:
            with disabled(model), torch.no_grad():
                out = LossContext(model, outputs=context.rerun()).logits
        finally:
            for module, mode in modes.items():
                module.training = mode
        return out.detach()
