"""GaLore's gradient projector: the top-``r`` singular vectors of a weight's gradient, refreshed every ``gap`` steps.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507,
Algorithm 2. For a gradient ``G`` (``m x n``) with truncated SVD ``G ~ U_r S_r V_r^T`` the projector is one side of it:

* ``right`` keeps ``Q = V_r^T`` (``r x n``): the low-rank gradient is ``R = G Q^T`` (``m x r``), back: ``R Q``;
* ``left`` keeps ``P = U_r`` (``m x r``): ``R = P^T G`` (``r x n``), back: ``P R``;
* ``std`` (the paper's default) takes the side that makes ``R`` the smaller: ``right`` when ``m >= n``, else ``left``,
  so the optimiser state of each projected matrix is ``max(m, n) x r`` instead of ``m x n``;
* ``reverse_std`` the other side; ``full`` both (``R = P^T G Q^T``, ``r x r``; for a matrix this is what Natural
  GaLore's Tucker decomposition computes).

The projection back is multiplied by ``scale`` (the paper's ``alpha``, 0.25 in its runs). The basis is stored as
tensors in the optimiser state (``ortho``, ``ortho_right`` for ``full``) so that a checkpoint restores it exactly;
the package ``galore-torch`` keeps it in a Python object instead. Its SVD runs in float32 like the package's.
"""

from __future__ import annotations

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def side(proj_type: str, shape: torch.Size) -> str:
    """``left``, ``right`` or ``full``: which factor of the SVD a ``proj_type`` keeps for a gradient of ``shape``."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def refresh(state: dict, grad: Tensor, rank: int, proj_type: str) -> None:
    """Recompute the basis of ``state`` from ``grad`` (GaLore's subspace switch)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    kept = side(proj_type, grad.shape)
    if kept == "left":
        state["ortho"] = u[:, :rank].to(grad.dtype)
    elif kept == "right":
        state["ortho"] = vh[:rank].to(grad.dtype)
    else:
        state["ortho"], state["ortho_right"] = u[:, :rank].to(grad.dtype), vh[:rank].to(grad.dtype)


def project(state: dict, grad: Tensor, proj_type: str) -> Tensor:
    """The low-rank gradient ``R`` of ``grad`` in the basis held by ``state``."""
    kept = side(proj_type, grad.shape)
    if kept == "left":
        return state["ortho"].t() @ grad
    if kept == "right":
        return grad @ state["ortho"].t()
    return state["ortho"].t() @ grad @ state["ortho_right"].t()


def project_back(state: dict, low: Tensor, proj_type: str, shape: torch.Size, scale: float) -> Tensor:
    """``scale`` times the full-size matrix of ``low`` (``shape`` is the weight's)."""
    kept = side(proj_type, shape)
    if kept == "left":
        full = state["ortho"] @ low
    elif kept == "right":
        full = low @ state["ortho"]
    else:
        full = state["ortho"] @ low @ state["ortho_right"]
    return full * scale
