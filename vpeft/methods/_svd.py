"""The thin SVD that the SVD-based methods (``soma``, ``salt``, ``comp_lora``) take of a loaded weight.

``svd(W)`` returns ``U (out x k)``, ``S (k,)`` descending and ``V (in x k)``, ``k = min(out, in)``, with
``W = U diag(S) V^T``, in float32 on the weight's device. It is called when an adapter is built, i.e. on the
pretrained weights that vpeft adapts (never before a checkpoint load).

* On CUDA (and other accelerators) it is ``torch.linalg.svd(W.float(), full_matrices=False)``.
* On the CPU it takes the eigendecomposition of the float64 Gram matrix of the short side, ``G = W^T W = V S^2 V^T``,
  then ``S = sqrt(eigenvalues)`` and ``U = W V / S``, all in float64, rounded to float32 at the end. With float64
  the Gram squaring costs no accuracy that a float32 SVD has: singular values carry an error of about
  ``1e-16 S_1^2 / S_i``, below float32's ``6e-8 S_1`` for every ``S_i`` above ``1e-9 S_1``, so the minor components
  (SoMA) are exact to float32 rounding. It runs on one thread (the previous count is restored): on a busy machine
  two OpenMP threads made single ``eigh``/``svd`` calls stall, and this path was faster than MKL's ``gesdd``. When a
  singular value is too small for ``W v_i / S_i`` to be trusted (a rank-deficient weight) it falls back to
  ``torch.linalg.svd``.

``torch.svd_lowrank`` (randomised, top-q only) is faster still but approximate and cannot give minor components;
the methods here use exact factors because SALT and Comp-LoRA build their updates on them. Timings of the three
(``V-PEFT-Bench/perf/svd_speed.py --compare``) are in ``V-PEFT-Bench/perf/results/cpu.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def svd(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` with ``weight = U @ diag(S) @ V.T``; float32, ``S`` descending, on ``weight``'s device."""
    w = weight.detach()
    if w.dim() != 2:
        raise ValueError(f"svd expects a 2-D (out, in) weight, got shape {tuple(w.shape)}.")
    if w.device.type != "cpu":
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
        return U, S, Vh.T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gram_svd(w)
    finally:
        torch.set_num_threads(threads)


def _gram_svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    wide = w.shape[0] < w.shape[1]
    a = (w.T if wide else w).float()  # (m, n), m >= n
    a64 = a.double()
    lam, V = torch.linalg.eigh(a64.T @ a64)  # float64, ascending
    S = lam.flip(0).clamp_min(0).sqrt()  # descending singular values, float64-accurate
    V = V.flip(1)
    tol = S[0] * max(a.shape) * torch.finfo(torch.float32).eps
    if S[0] == 0 or S[-1] <= tol:  # rank-deficient: U is not determined by W V / S there
        U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
        return U, S, Vh.T
    U = ((a64 @ V) / S).float()  # (m, n): U S = W V; float64 keeps U orthonormal for small S too
    S, V = S.float(), V.float()
    return (V, S, U) if wide else (U, S, V)
