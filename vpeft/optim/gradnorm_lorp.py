"""GradNormLoRP: weight normalisation of each projected weight, with GaLore's projection of the direction's gradient.

Huang et al., "Gradient Weight-normalized Low-rank Projection for Efficient LLM Training", AAAI 2025,
arXiv:2412.19616. Each chosen weight is reparametrised per output row as ``W = g * V / ||V||`` (weight normalisation,
Salimans & Kingma, NeurIPS 2016, arXiv:1602.07868, eq. 2); the magnitude ``g`` (``m x 1``) and the direction ``V``
are trained, the direction through a low-rank projection of its gradient. With ``V`` kept at unit rows the gradients
are (Salimans & Kingma eq. 3 with ``||V|| = 1``)::

    grad_g = rowsum(grad_W * V)                  grad_V = g * (grad_W - grad_g * V)

``grad_V`` goes through GaLore (projector.py, Adam moments in the ``max(m, n) x r`` projection, back with ``scale``),
``grad_g`` through a plain Adam step; then ``W = g * V / ||V||``. Decoupled weight decay shrinks ``g`` (the direction
is scale-free). Tensors that are not projected take the plain Adam step of GaLore.

Headline defaults: the paper's pre-training runs (its README): ``rank`` 128, ``update_proj_gap`` 250 (GaLore's 200
kept here for one default across the family), ``scale`` 0.25; ``eps`` 1e-6. Departures from the authors' code
(``GradNormLoRP/LowRankWeightNormAdamW.py``), which keeps a full copy of ``V`` in the optimiser state, overwrites the
magnitude with ``||V||`` at the start of each step (so the magnitude's own update is lost) and omits both the factor
``g`` and the removal of the radial part in ``grad_V``: here the math is the paper's weight normalisation, and ``V``
is renormalised to unit rows after every step (it does not change ``W``), so ``V = W / g`` is read from the weight
itself and the state holds only ``g`` and the low-rank moments.
"""

from __future__ import annotations

import math

import torch

from . import projector
from .galore import LowRankAdamW


class GradNormLoRPAdamW(LowRankAdamW):
    """Weight-normalised GaLore-Adam (module docstring); groups without ``rank`` take GaLore's plain step."""

    def update(self, group: dict, p: torch.Tensor) -> None:
        if "rank" not in group:
            super().update(group, p)
            return
        beta1, beta2 = group["betas"]
        grad, state = p.grad, self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["magnitude"] = p.norm(dim=1, keepdim=True)
            for key in ("exp_avg_g", "exp_avg_sq_g"):
                state[key] = torch.zeros_like(state["magnitude"])
        g = state["magnitude"]
        v = p / torch.where(g == 0, torch.ones_like(g), g)  # the unit-row direction (a zero row stays zero)
        grad_g = (grad * v).sum(dim=1, keepdim=True)
        grad_v = g * (grad - grad_g * v)
        if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
            projector.refresh(state, grad_v, group["rank"], group["proj_type"])
        low = projector.project(state, grad_v, group["proj_type"])
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        state["step"] += 1
        t = state["step"]
        step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        updates = []
        pairs = ((state["exp_avg"], state["exp_avg_sq"], low), (state["exp_avg_g"], state["exp_avg_sq_g"], grad_g))
        for m, s, x in pairs:
            m.mul_(beta1).add_(x, alpha=1.0 - beta1)
            s.mul_(beta2).addcmul_(x, x, value=1.0 - beta2)
            updates.append(m / s.sqrt().add_(group["eps"]))
        v = v - step_size * projector.project_back(state, updates[0], group["proj_type"], p.shape, group["scale"])
        g.add_(updates[1], alpha=-step_size)
        if group["weight_decay"] > 0.0:
            g.add_(g, alpha=-group["lr"] * group["weight_decay"])
        if group["lr"] == 0:  # W is unchanged; rebuilding it would still round it (torch's checkpoint loader takes
            return  # such a step to create the state it then overwrites)
        norm = v.norm(dim=1, keepdim=True)
        p.copy_(g * v / torch.where(norm == 0, torch.ones_like(norm), norm))
