"""Natural GaLore: GaLore whose projected gradient is preconditioned by an inverse empirical Fisher (Woodbury).

Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning", arXiv:2410.16029;
the math as in its code (``selfsupervised-ai/Natural-GaLore``, ``code/natural_galore/galore_projector_tensor.py``,
``_natural_gradient_transform``). Each projected weight keeps the last ``s`` projected gradients, flattened, as the
columns of ``G`` (``k x s``, the current one included) and replaces the projected gradient ``g`` by::

    g~ = (lambda I + G G^T)^{-1} g = g / lambda - G (I + G^T G / lambda)^{-1} G^T g / lambda^2      (Woodbury)

an ``s x s`` Cholesky solve instead of a ``k x k`` one; Adam's moments then run on ``g~`` as in GaLore.

Headline defaults: ``natural_history`` 20 and ``damping`` (lambda) 1e-3 are the code's; ``rank``, ``update_proj_gap``
and ``scale`` are GaLore's. Departures: the code projects with a Tucker decomposition (tensorly), which for a weight
matrix is the two-sided truncated SVD, so the default ``proj_type`` here is ``full`` (``P^T G Q^T``, ``r x r``, through
projector.py, no tensorly); the history is a tensor in the optimiser state (``history``, ``s x k``, zeros until
filled; zero columns leave the solve unchanged) so that a checkpoint restores it. As in the code, the history is not
cleared when the subspace is refreshed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .galore import LowRankAdamW


def woodbury_natural_gradient(grad: Tensor, history: Tensor, damping: float) -> Tensor:
    """``(damping I + G G^T)^{-1} grad`` with ``G = history^T`` (``history``: ``s x k``, ``grad``: ``k``), through the
    ``s x s`` system ``I + G^T G / damping`` (Cholesky), as the Natural GaLore code computes it."""
    inv = 1.0 / damping
    small = history @ history.t() * inv  # G^T G / lambda, s x s
    small.diagonal().add_(1.0)
    solved = torch.cholesky_solve((history @ grad).unsqueeze(1), torch.linalg.cholesky(small)).squeeze(1)
    return grad * inv - (history.t() @ solved) * inv**2


class NaturalGaLoreAdamW(LowRankAdamW):
    """GaLore-Adam with the Woodbury natural-gradient step in the projected subspace (module docstring)."""

    def transform(self, group: dict, state: dict, low: Tensor) -> Tensor:
        flat = low.reshape(-1)
        if "history" not in state:
            state["history"] = torch.zeros(group["natural_history"], flat.numel(), dtype=low.dtype, device=low.device)
        history = state["history"]
        history.copy_(torch.roll(history, -1, dims=0))  # drop the oldest row, the newest goes last
        history[-1] = flat
        return woodbury_natural_gradient(flat, history, group["damping"]).view_as(low)
