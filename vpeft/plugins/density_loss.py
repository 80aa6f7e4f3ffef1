"""``density_loss``: DEFT's activation-density loss, a plug-in that runs beside any method.

Paper: "From PEFT to DEFT: Parameter Efficient Finetuning for Reducing Activation Density in Transformers"
(Ardakani et al., arXiv 2402.01911); code ``IBM/DEFT`` (``compute_l0_penalty``). The loss adds a smooth surrogate of
the fraction of non-zero MLP activations (their L0 "density") to the task loss (paper eq. 3-4):

    L = L_task + weight * mean_layers [ mean_{tokens, neurons} a^2 / (a^2 + eps) ]

where ``a`` is the MLP's intermediate activation, here the input of its down projection (role ``mlp_out``: BERT's
``output.dense``, GPT-2's ``mlp.c_proj``, Llama's ``mlp.down_proj``, timm's ``mlp.fc2``), so one tap serves plain and
gated MLPs. ``a^2/(a^2+eps)`` is 0 at ``a = 0`` and close to 1 once ``|a| >> sqrt(eps)``. Evaluation counts the true
density, the share of ``|a| > threshold`` (:func:`density`); DEFT counts exact non-zeros (``threshold = 0``), which
for a ReLU MLP is the point. A GELU MLP (BERT, MiniLM) is never exactly 0, so there a small threshold is the honest
measure of what the loss buys; the results file says which threshold each number used.

Headline defaults: ``eps = 1e-7`` (the code's) and ``weight = 0.1`` (the paper tunes it per task; no single
value). With a GELU MLP the code's ``eps`` leaves the loss nearly flat: a GELU output is almost never within
``sqrt(eps) = 3e-4`` of 0 (MiniLM on WordNet-16: 98% of its activations exceed 1e-3), so ``a^2/(a^2+eps)`` is about 1
with almost no slope; measured on the tiny BERT (tests/methods/test_plugins.py), 30 steps move the surrogate from
0.991 to 0.981 and the density not at all, where ``eps = 1e-2`` takes it from 0.18 to 0.08. For such models set
``eps`` near the square of the activations' scale (``1e-2`` for MiniLM, whose activations are mostly 0.01-0.3).
The name is ``density_loss``, not ``deft``: HF PEFT's ``deft`` is another method (Decompositional Efficient
Fine-Tuning).

Departures: padding tokens are left out of the token mean when the batch has an ``attention_mask`` of the
activations' (batch, tokens) shape (the code averages over every position); taps are on the roles' down projections
of ``targets``/``layers`` (default every block), whatever the adapter adapts.

Measured (WordNet-16, MiniLM, LoRA r=8 q/v with head, 120 steps, seed 0, ``eps = 1e-2``; the commands and the
table in V-PEFT-Bench/results/lm/density_loss.md): at weight 1 the share of MLP activations above 0.01 falls from
93.28% to 91.68% (above 0.1: 60.35% to 57.98%) with test accuracy 80.20 against LoRA's 79.47; at weight 5 it falls to
76.42% at a cost of 3.7 points; at weight 20 the classifier collapses to chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import ROLES, LossContext, MethodConfig, NonNegativeFloat, Plugin, PositiveFloat, name_matches, walk
from ..errors import ConfigError


@dataclass
class DensityLossConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp_out",)  # modules whose input is the MLP activation (roles or patterns)
    weight: NonNegativeFloat = 0.1
    eps: PositiveFloat = 1e-7


def density_penalty(activations: list[Tensor], eps: float, masks: list[Tensor | None] | None = None) -> Tensor:
    """``mean_layers mean_{tokens, neurons} a^2/(a^2+eps)``; ``masks[i]`` (bool, the activation's leading shape)
    keeps only those tokens of layer ``i``."""
    terms = []
    for i, a in enumerate(activations):
        a2 = a.float().pow(2)
        surrogate = a2 / (a2 + eps)
        mask = masks[i] if masks is not None else None
        terms.append(surrogate[mask].mean() if mask is not None else surrogate.mean())
    return torch.stack(terms).mean()


def density(activations: list[Tensor], threshold: float = 0.0) -> float:
    """The share of activation entries with ``|a| > threshold``, over all layers' entries (the true density)."""
    above = sum(int((a.abs() > threshold).sum()) for a in activations)
    return above / max(sum(a.numel() for a in activations), 1)


def mlp_activation_modules(model: nn.Module, targets: tuple[str, ...], layers: tuple[int, ...] | None) -> list:
    """``(path, module)`` of the modules whose input is an MLP activation: ``targets`` (roles expand) in ``layers``."""
    patterns = [p.split("[")[0] for entry in targets for p in ROLES.get(entry, (entry,))]
    found = [
        (path, module)
        for path, module in walk(model)
        if any(name_matches(path, p) for p in patterns) and (layers is None or _block(path) in layers)
    ]
    return found


def _block(path: str) -> int | None:
    """The block index of a module path: its first integer piece (``encoder.layer.3.output.dense`` -> 3)."""
    return next((int(piece) for piece in path.split(".") if piece.isdigit()), None)


class ActivationTap:
    """Forward pre-hooks that keep the first input of each module while ``recording``."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        self.kept: list[Tensor] = []
        self.recording = False
        self.handles = [m.register_forward_pre_hook(self._keep, with_kwargs=True) for _, m in modules]

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.recording:
            self.kept.append(args[0] if args else next(iter(kwargs.values())))

    def take(self) -> list[Tensor]:
        kept, self.kept = self.kept, []
        return kept

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class DensityLoss(Plugin):
    Config = DensityLossConfig

    def __init__(self, model: nn.Module, config: DensityLossConfig):
        super().__init__(model, config)
        modules = mlp_activation_modules(model, config.targets, config.layers)
        if not modules:
            raise ConfigError(
                f"density_loss: targets {list(config.targets)} match no module of {type(model).__name__} (they name "
                "the modules whose input is the MLP activation, e.g. the role mlp_out); name them by path."
            )
        self.tap = ActivationTap(modules)

    def begin(self, context: LossContext) -> None:
        self.tap.take()
        self.tap.recording = True

    def end(self, context: LossContext) -> None:
        self.tap.recording = False

    def loss(self, context: LossContext) -> Tensor | None:
        kept = self.tap.take()
        if not kept or self.config.weight == 0:
            return None
        return self.config.weight * density_penalty(kept, self.config.eps, [_token_mask(context, a) for a in kept])

    def close(self) -> None:
        self.tap.close()


def _token_mask(context: LossContext | None, activation: Tensor) -> Tensor | None:
    batch = context.batch if context is not None else None
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or activation.dim() < 3 or tuple(mask.shape) != tuple(activation.shape[:2]):
        return None
    return mask.to(activation.device).bool()
