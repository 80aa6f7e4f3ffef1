"""Differential privacy: clipping, Gaussian noise and the accountant (opacus's RDP accountant).

Both privacy units use the Gaussian mechanism on a sum of clipped contributions:

- DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, arXiv:1607.00133, Algorithm 1): each
  example's gradient is clipped to L2 norm C, ``g_i <- g_i * min(1, C / ||g_i||)``, and the step uses
  ``(sum_i g_i + N(0, sigma^2 C^2 I)) / L`` with L the expected batch size (Poisson rate q = L / N). The norm is
  over all trainable tensors together. :func:`dp_sgd_gradient` computes each example's gradient with its own
  backward pass (exact and model-agnostic, slower than vectorised per-sample gradients).
- DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
  2018, arXiv:1710.06963): each client's model update ``Delta_k = theta_k - theta`` is clipped to C and the server
  applies ``theta + (sum_k Delta_k + N(0, sigma^2 C^2 I)) / m`` for m sampled clients (rate q = m / K); this is
  user-level DP, the setting of DP-DyLoRA (Xu et al., arXiv:2405.06368, Sec. 3), whose server draws one DyLoRA rank
  per round for all clients so that the clipped updates share one shape and the sensitivity stays C.

:class:`Accountant` wraps opacus's ``RDPAccountant`` (Mironov, "Renyi Differential Privacy", CSF 2017; the sampled
Gaussian mechanism of Mironov, Talwar and Zhang 2019): one ``step`` per noisy aggregation with its noise multiplier
sigma and sampling rate q, and ``epsilon(delta)`` for the (epsilon, delta) spent so far. opacus comes with vpeft's
``dp`` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError

State = Mapping[str, Tensor]


def check_dp(clip_norm: float, noise_multiplier: float, delta: float) -> None:
    """The DP options, each with its valid range."""
    if not clip_norm > 0:
        raise ConfigError(f"the DP clipping norm C must be > 0, got {clip_norm} (the paper's runs use about 0.1 to 1).")
    if not noise_multiplier >= 0:
        raise ConfigError(f"the DP noise multiplier sigma must be >= 0, got {noise_multiplier} (0: no privacy).")
    if not 0 < delta < 1:
        raise ConfigError(f"the DP delta must be in (0, 1), got {delta}; use well below 1 / (number of users).")


def global_norm(tensors: Sequence[Tensor] | State) -> float:
    """The L2 norm of all tensors together."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return float(sum(t.double().pow(2).sum() for t in values) ** 0.5)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / norm)``: the factor that brings a contribution of L2 norm ``norm`` within C."""
    return min(1.0, clip_norm / norm) if norm > 0 else 1.0


def gaussian_noise(like: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std^2)`` noise of ``like``'s shape (drawn on the CPU from ``generator``, so runs repeat)."""
    return torch.randn(like.shape, generator=generator, dtype=torch.float64) * std


def dp_sgd_gradient(
    params: Sequence[nn.Parameter],
    example_losses: Callable[[int], Tensor],
    examples: int,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    expected_batch: float | None = None,
) -> list[float]:
    """Set ``p.grad`` of ``params`` to DP-SGD's noisy mean of clipped per-example gradients and return the examples'
    gradient norms before clipping. ``example_losses(i)`` is example i's loss (a scalar with a graph);
    ``expected_batch`` is L in the denominator (default ``examples``)."""
    sums = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    norms = []
    for i in range(examples):
        grads = torch.autograd.grad(example_losses(i), list(params), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        norm = global_norm(grads)
        norms.append(norm)
        factor = clip_factor(norm, clip_norm)
        for s, g in zip(sums, grads, strict=True):
            s += g.detach().double().cpu() * factor
    denominator = expected_batch or examples
    for p, s in zip(params, sums, strict=True):
        noisy = s + gaussian_noise(s, noise_multiplier * clip_norm, generator)
        p.grad = (noisy / denominator).to(dtype=p.dtype, device=p.device)
    return norms


def dp_fedavg(
    server: State,
    clients: Sequence[State],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    keys: Sequence[str] | None = None,
) -> tuple[dict[str, Tensor], list[float]]:
    """DP-FedAvg's new server state and the clients' update norms before clipping. ``keys`` are the tensors that
    train (default all); the others keep the server's values (a frozen FFA-LoRA A, DyLoRA's untouched ranks are
    updates of zero and cost nothing)."""
    keys = list(server) if keys is None else list(keys)
    sums = {k: torch.zeros(server[k].shape, dtype=torch.float64) for k in keys}
    norms = []
    for state in clients:
        update = {k: state[k].double().cpu() - server[k].double().cpu() for k in keys}
        norm = global_norm(update)
        norms.append(norm)
        factor = clip_factor(norm, clip_norm)
        for k in keys:
            sums[k] += update[k] * factor
    out = {k: v.clone() for k, v in server.items()}
    for k in keys:
        noisy = sums[k] + gaussian_noise(sums[k], noise_multiplier * clip_norm, generator)
        out[k] = (server[k].double().cpu() + noisy / len(clients)).to(server[k].dtype)
    return out, norms


class Accountant:
    """The (epsilon, delta) spent by a sequence of sampled Gaussian mechanisms: opacus's RDP accountant."""

    def __init__(self) -> None:
        accountants = require("opacus.accountants", "dp", "differentially private training's accountant")
        self._rdp = accountants.RDPAccountant()
        self.steps = 0

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one noisy aggregation with noise multiplier sigma at sampling rate q."""
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"the DP sampling rate must be in (0, 1], got {sample_rate}.")
        self._rdp.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.steps += 1

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` (inf with no noise; 0 before any step)."""
        if self.steps == 0:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self._rdp.history):
            return float("inf")
        return float(self._rdp.get_epsilon(delta=delta))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` runs, as opacus records them."""
        return [tuple(h) for h in self._rdp.history]  # type: ignore[misc]
