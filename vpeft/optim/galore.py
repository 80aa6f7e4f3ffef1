"""GaLore: Adam whose moments live in a low-rank projection of each chosen weight's gradient.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507,
Algorithm 2 (GaLore-Adam). For a projected weight ``W`` (``m x n``) with gradient ``G_t``::

    P_t = top-r singular vectors of G_t, recomputed when t % T == 0      (T: update_proj_gap)
    R_t = project(G_t)                                                     (max(m, n) x r; projector.py)
    M_t = b1 M_{t-1} + (1 - b1) R_t,   V_t = b2 V_{t-1} + (1 - b2) R_t^2
    N_t = M_t / (sqrt(V_t) + eps)
    W  <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * alpha * project_back(N_t)
    W  <- W - lr * weight_decay * W                                        (decoupled decay, after the step)

Every other trainable tensor gets the same Adam step without projection, as in the package. The moments are not
reset when the subspace switches (neither in the paper's Algorithm 2 nor in its code).

Headline defaults (the paper's pre-training runs): ``rank`` 128, ``update_proj_gap`` 200, ``scale`` 0.25,
``proj_type`` ``std``; ``eps`` 1e-6 and decay after the step are the package's ``GaLoreAdamW``
(``galore-torch`` 1.0), which this equals step for step (tests/optim/test_galore.py). Departures from the package:
the basis is kept as tensors in the optimiser state (a checkpoint restores it exactly), the side of a ``std``
projection is decided once from the weight's shape rather than from each low-rank tensor's, and which tensors are
projected is chosen by module patterns (``targets``) rather than by building parameter groups by hand.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import projector


class LowRankAdamW(torch.optim.Optimizer):
    """GaLore-Adam (see the module docstring). A parameter group with a ``rank`` key is projected, with its
    ``update_proj_gap``, ``scale`` and ``proj_type``; the others take the plain step.

    Subclasses change the projected gradient before the moments see it (:meth:`transform`, Natural GaLore).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def transform(self, group: dict, state: dict, low: Tensor) -> Tensor:
        """The projected gradient the moments see; GaLore uses it as it is."""
        return low

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(group, p)
        return loss

    def update(self, group: dict, p: Tensor) -> None:
        """One parameter's step (called under ``no_grad``)."""
        beta1, beta2 = group["betas"]
        projected = "rank" in group
        grad, state = p.grad, self.state[p]
        if "step" not in state:
            state["step"] = 0
        if projected:
            if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                projector.refresh(state, grad, group["rank"], group["proj_type"])
            grad = self.transform(group, state, projector.project(state, grad, group["proj_type"]))
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        t = state["step"]
        step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        update = exp_avg / denom
        if projected:
            update = projector.project_back(state, update, group["proj_type"], p.shape, group["scale"])
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
