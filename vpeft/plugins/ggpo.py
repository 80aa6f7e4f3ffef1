"""``ggpo``: LoRA-GGPO's gradient-guided weight perturbation, a plug-in beside a weight-space adapter (LoRA...).

Paper: "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation Optimization"
(Chang et al., arXiv 2502.14538v1; v2 is LoRA-MGPO, momentum-guided); code cited as ``llm172/LoRA-GGPO``, not
available here. The adapter is trained on a smoothed objective, ``min E_eps L(W0 + dW + eps)``, whose one-sample
gradient is taken at a perturbed merged weight ``W' = W0 + dW``: SAM-like flatness at one gradient computation per
step. The perturbation is Gaussian, row-wise scaled by a weighted combination of the merged weight's row norms and
the row norms of the loss gradient with respect to it (the paper's eq. for ``Sigma``):

    eps_ij = std_i * xi_ij,  xi ~ N(0, 1),  std_i = sigma * sqrt((alpha ||W'_i||^2 + beta ||G_i||^2) / n)

with ``G = dL/dW'`` from the previous optimizer step (zero before the first; ``n`` the row length). Per step:
:meth:`perturb` draws ``eps`` for every module the active adapter changes (only the rows of its adapted slices on a
fused projection), the step's forward and backward passes run at ``W' + eps`` (a hook adds ``x eps^T`` to the base
layer's output, so the stored weights are never written), :meth:`restore` drops ``eps`` before the optimizer step.
The optimizer thus applies an ordinary step to the perturbed point's gradient, and nothing of ``eps`` reaches the
saved weights (tests/methods/test_plugins_ggpo.py checks both). ``G`` is gathered by the same hook
(``G = sum g^T x`` over the step's micro-batches, ``g`` the gradient at the output), a full-size matrix per adapted
module while the step runs: the memory of one full-rank gradient of those modules.

Defaults: ``sigma = 0.05``, ``alpha = beta = 1``. Departures: the paper's exact normalisation and defaults could not
be read here (the note in ../shared/notes/methods-lm.md marks the form "[paper, partial]"; session 9 looked again: no
snapshot of ``llm172/LoRA-GGPO`` can be fetched, and the stored copies of arXiv 2502.14538 v1/v2 hold the abstract
only; kohya-style trainers that call their option GGPO default to ``sigma = 0.03, beta = 0.01`` with a formula of
their own, which is not the paper's and is not taken here): ours normalises by the
row length, so ``sigma`` is the noise relative to a row's RMS; the gradient norms are the previous step's (the
paper's "one gradient computation per step" allows no other), and after a resume the first step has none (they are
not in the checkpoint); weights of a non-additive method count as ``W0``; attention modules (``nn.MultiheadAttention``)
and heads are not perturbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import WHOLE, MethodConfig, NonNegativeFloat, Plugin, PositiveFloat, active_adapter, adapted_modules
from ..core import weight_and_bias as base_weight
from ..errors import ConfigError


@dataclass
class GGPOConfig(MethodConfig):
    sigma: PositiveFloat = 0.05
    alpha: NonNegativeFloat = 1.0  # weight of the merged weight's row norms
    beta: NonNegativeFloat = 1.0  # weight of the gradient's row norms


def noise_scale(merged: Tensor, grad: Tensor | None, sigma: float, alpha: float, beta: float) -> Tensor:
    """``std_i = sigma * sqrt((alpha ||W'_i||^2 + beta ||G_i||^2) / n)`` for each row ``i`` of ``(out, n)``."""
    energy = alpha * merged.float().pow(2).sum(1)
    if grad is not None:
        energy = energy + beta * grad.float().pow(2).sum(1)
    return sigma * (energy / merged.shape[1]).sqrt()


class _Site:
    """One adapted module: its perturbation hook, the current noise and the gradient gathered for the next step."""

    def __init__(self, path: str, base: nn.Module, rows: Tensor):
        self.path, self.base, self.rows = path, base, rows
        self.noise: Tensor | None = None
        self.grad: Tensor | None = None  # dL/dW' summed over this step's passes
        self.handle = base.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        y = output[0] if isinstance(output, tuple) else output
        if self.noise is None or not torch.is_grad_enabled():
            return None
        x = args[0]
        y = y + F.linear(x, self.noise.to(x.dtype))
        if not y.requires_grad:  # the first adapted layer of a frozen stack: its output is a leaf; G needs its grad
            y.requires_grad_(True)
        y.register_hook(lambda g: self._gather(g, x))
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def _gather(self, g: Tensor, x: Tensor) -> None:
        step = g.flatten(0, -2).float().T @ x.detach().flatten(0, -2).float()
        self.grad = step if self.grad is None else self.grad + step

    def close(self) -> None:
        self.handle.remove()


class GGPO(Plugin):
    Config = GGPOConfig

    def __init__(self, model: nn.Module, config: GGPOConfig):
        super().__init__(model, config)
        self.adapter = active_adapter(model)
        self.sites: list[_Site] = []
        self.last_grad: dict[str, Tensor] = {}
        self.last_scale: dict[str, Tensor] = {}  # std per row of the current step (tests read it)
        for adapted in adapted_modules(model, self.adapter):
            weight = base_weight(adapted.base)[0]
            if adapted.head or weight.dim() != 2 or isinstance(adapted.base, nn.MultiheadAttention):
                continue
            rows = torch.zeros(weight.shape[0], dtype=torch.bool)
            for part in adapted.parts:
                rows[adapted.slices[part] if part != WHOLE else slice(None)] = True
            self.sites.append(_Site(adapted.path, adapted.base, rows))
        if not self.sites:
            raise ConfigError(
                "ggpo perturbs the weight matrices an adapter changes, and this adapter changes none (it adapts "
                "heads, norms or attention modules only); use it with a weight-space method such as lora."
            )
        self.modules = {a.path: a for a in adapted_modules(model, self.adapter)}

    def merged_weight(self, path: str) -> Tensor:
        """``W' = W0 + dW`` of one adapted module, ``(out, in)``, without gradient."""
        adapted = self.modules[path]
        weight = base_weight(adapted.base)[0].detach().float().clone()
        with torch.no_grad():
            for part, module in adapted.parts.items():
                rows = adapted.slices[part] if part != WHOLE else slice(None)
                try:
                    weight[rows] += module.delta_weight().float()
                except NotImplementedError:  # a non-additive method: W0 stands for W'
                    pass
        return weight

    def perturb(self, model: nn.Module) -> None:
        cfg = self.config
        for site in self.sites:
            grad, site.grad = site.grad, None  # the last step's gradient guides this step's noise
            if grad is not None:
                self.last_grad[site.path] = grad
            merged = self.merged_weight(site.path)
            scale = noise_scale(merged, self.last_grad.get(site.path), cfg.sigma, cfg.alpha, cfg.beta)
            scale = scale * site.rows.to(scale.device)
            self.last_scale[site.path] = scale
            site.noise = scale[:, None] * torch.randn_like(merged)

    def restore(self, model: nn.Module) -> None:
        for site in self.sites:
            site.noise = None

    def close(self) -> None:
        for site in self.sites:
            site.close()
