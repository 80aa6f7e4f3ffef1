"""Server-side aggregation of client adapters, on the tensors of the public adapter files (``vpeft.core
.adapter_tensors`` / ``adapter_model.safetensors``: keys such as ``...query.lora_A``, ``...query.lora_B``,
``head.weight``).

FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017,
arXiv:1602.05629) averages every tensor with the clients' weights ``p_k = n_k / sum n`` (their item counts):
``theta' = sum_k p_k theta_k``. On LoRA this is FedIT's rule, and it is biased: the served update is
``(sum p_k B_k)(sum p_k A_k)``, not the clients' average update ``sum p_k B_k A_k``.

FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313; ``vpeft.methods.ffa_lora``) freezes A at a shared random init, so
FedAvg of B is exact: ``(sum p_k B_k) A0 = sum p_k B_k A0``. :func:`ffa_lora` is FedAvg that first checks that every
client holds the same A (a client that changed A would make the average inexact).

LoRA-FAIR (Bian, Wang, Zhang and Xu, ICCV 2025, arXiv:2411.14961, Sec. 4) keeps FedAvg's ``A_bar`` and ``B_bar``
and adds a server-side residual ``Delta B`` so that ``(B_bar + Delta B) A_bar`` is close to the ideal update
``M = sum p_k B_k A_k`` while ``Delta B`` stays small (eq. 4: ``argmin_dB S(M, (B_bar + dB) A_bar) + lam ||dB||``);
clients start the next round from ``(A_bar, B_bar + Delta B)`` ("Avg-Initial", no re-initialisation, no extra
communication). Departure: the paper's similarity term is minimised by gradient steps on the server; here it is the
squared Frobenius distance with a ridge penalty, whose minimiser is closed-form,

    Delta B = (M - B_bar A_bar) A_bar^T (A_bar A_bar^T + lam' I)^{-1},    lam' = lam * trace(A_bar A_bar^T) / r,

(the ridge scaled by A_bar's mean squared singular value, so ``lam`` does not depend on the tensors' scale; default
0.01). Since ``Delta B = 0`` is feasible, the corrected residual ``||M - (B_bar + Delta B) A_bar||_F`` is never above
FedAvg's (:func:`residual` measures both). A LoRA's scale ``alpha / r`` is common to all clients and cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

State = Mapping[str, Tensor]
RULES = ("fedavg", "ffa_lora", "lora_fair")


def client_weights(sizes: Sequence[int]) -> list[float]:
    """FedAvg's ``p_k = n_k / sum_j n_j``."""
    total = sum(sizes)
    if total <= 0 or any(n < 0 for n in sizes):
        raise DataError(f"client sizes {list(sizes)} must be non-negative with a positive total.")
    return [n / total for n in sizes]


def _check(states: Sequence[State], weights: Sequence[float]) -> None:
    if not states or len(states) != len(weights):
        raise DataError(
            f"aggregation needs one weight per client state, got {len(states)} states, {len(weights)} weights."
        )
    keys = set(states[0])
    for k, state in enumerate(states[1:], 1):
        if set(state) != keys:
            odd = sorted(set(state) ^ keys)[:5]
            raise DataError(f"client {k}'s adapter does not have client 0's tensors (differing keys, e.g. {odd}).")


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_k p_k theta_k`` for every tensor (float64 sums, returned in each tensor's dtype)."""
    _check(states, weights)
    return {
        key: sum(w * s[key].double() for s, w in zip(states, weights, strict=True)).to(states[0][key].dtype)  # type: ignore[union-attr]
        for key in states[0]
    }


def lora_pairs(state: State) -> list[str]:
    """The prefixes ``p`` with both ``p.lora_A`` (r, in) and ``p.lora_B`` (out, r) matrices in ``state``."""
    return sorted(
        key[: -len(".lora_A")]
        for key, value in state.items()
        if key.endswith(".lora_A") and value.dim() == 2 and f"{key[: -len('.lora_A')]}.lora_B" in state
    )


def ffa_lora(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg after checking that A is the same on every client (then averaging B is exact)."""
    _check(states, weights)
    for prefix in lora_pairs(states[0]):
        a0 = states[0][f"{prefix}.lora_A"]
        for k, state in enumerate(states[1:], 1):
            if not torch.equal(state[f"{prefix}.lora_A"], a0):
                raise ConfigError(
                    f"ffa_lora aggregation: client {k}'s {prefix}.lora_A differs from client 0's. FFA-LoRA's averaging "
                    "is exact only when every client keeps the shared frozen A: train the clients with method "
                    "ffa_lora, starting from the server's adapter."
                )
    return fedavg(states, weights)


def ideal_update(states: Sequence[State], weights: Sequence[float], prefix: str) -> Tensor:
    """``M = sum_k p_k B_k A_k`` (float64) for the LoRA at ``prefix``."""
    return sum(
        w * (s[f"{prefix}.lora_B"].double() @ s[f"{prefix}.lora_A"].double())
        for s, w in zip(states, weights, strict=True)
    )  # type: ignore[return-value]


def lora_fair(states: Sequence[State], weights: Sequence[float], lam: float = 0.01) -> dict[str, Tensor]:
    """FedAvg plus LoRA-FAIR's residual ``Delta B`` on every LoRA pair (module docstring)."""
    if lam < 0:
        raise ConfigError(f"lora_fair's lam must be >= 0, got {lam}.")
    out = fedavg(states, weights)
    for prefix in lora_pairs(out):
        a = out[f"{prefix}.lora_A"].double()
        b = out[f"{prefix}.lora_B"].double()
        gram = a @ a.T
        ridge = lam * gram.trace() / a.shape[0]
        gram = gram + (ridge if ridge > 0 else 1e-12) * torch.eye(a.shape[0], dtype=gram.dtype)
        target = ideal_update(states, weights, prefix) - b @ a
        delta = torch.linalg.solve(gram, (target @ a.T).T).T  # (M - B A) A^T (A A^T + lam' I)^{-1}, gram symmetric
        out[f"{prefix}.lora_B"] = (b + delta).to(out[f"{prefix}.lora_B"].dtype)
    return out


def aggregate(rule: str, states: Sequence[State], weights: Sequence[float], lam: float = 0.01) -> dict[str, Tensor]:
    """The server's new adapter tensors under ``rule`` (one of :data:`RULES`)."""
    if rule == "fedavg":
        return fedavg(states, weights)
    if rule == "ffa_lora":
        return ffa_lora(states, weights)
    if rule == "lora_fair":
        return lora_fair(states, weights, lam)
    raise ConfigError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}.")


def residual(states: Sequence[State], weights: Sequence[float], served: State) -> float:
    """``sqrt(sum over LoRA pairs of ||sum_k p_k B_k A_k - B' A'||_F^2)``: how far the served adapter's updates are
    from the clients' average update (0 for an exact aggregation)."""
    total = 0.0
    for prefix in lora_pairs(served):
        got = served[f"{prefix}.lora_B"].double() @ served[f"{prefix}.lora_A"].double()
        total += float((ideal_update(states, weights, prefix) - got).pow(2).sum())
    return total**0.5
