"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix
Adaptation", ICLR 2024, arXiv:2310.11454), eq. 1:

    h = W0 x + Lambda_b B Lambda_d A x,    A in R^{r x d_in}, B in R^{d_out x r} frozen, random, shared by all layers

Only the per-layer vectors are trained: ``d`` (``Lambda_d = diag(d)``, r entries, initialised to ``d_initial``) and
``b`` (``Lambda_b = diag(b)``, d_out entries, zeros), so the adapted model equals the base model at initialisation
and ``W0 + diag(b) B diag(d) A`` merges exactly. Parameters: ``r + d_out`` per target; on all-MiniLM-L6-v2 q and v
at r = 256: 6 * 2 * (256 + 384) = 7,680 (PEFT's count); on ViT-B/16 q and v: 12 * 2 * (256 + 768) = 24,576.

The shared pair is HF PEFT's (``peft/tuners/vera/model.py``): one A of shape ``(r, max d_in)`` and one B of shape
``(max d_out, r)`` over all targets, each target reading the leading block ``A[:, :d_in]``, ``B[:d_out, :]``. Both are
drawn from one ``torch.Generator`` seeded with ``projection_prng_key``, A first, with Kaiming-uniform bounds of gain
sqrt(2) (``bound = sqrt(6 / fan_in)``: d_in for A, r for B). With the same key and the same targets the projections
are bit-identical to PEFT's, which is what makes the two libraries train alike. They are buffers: never trained, and
saved with the adapter unless ``save_projection=False`` (then rebuilt from the key when the adapter is loaded).

Defaults are PEFT's: r = 256 on q and v, ``d_initial = 0.1``, no dropout. ``r`` is the width of the random
projection, not the rank of a factorisation; it may exceed a layer's width (the paper uses r up to 1024 on 1024-wide
models), so it is not checked against the target shapes. On a fused projection each adapted slice is its own target
(its own b and d, reading ``B[:d_slice]``); HF PEFT adapts the whole fused module.

Departures from the paper: the paper initialises A and B with Kaiming uniform as well, without fixing a generator; the
seeded generator is PEFT's, for reproducibility and equivalence. Wraps Linear (and HF Conv1D) and fused-projection
slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, NonNegativeInt, PositiveInt, Target
from ._blocks import dropout


@dataclass
class VeRAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: PositiveInt = 256  # width of the shared random projection
    d_initial: FiniteFloat = 0.1  # initial value of every entry of d
    dropout: DropProbability = 0.0  # on the input of the VeRA branch
    projection_prng_key: NonNegativeInt = 0  # seed of the generator that draws A and B (PEFT's option)
    save_projection: bool = True  # save A and B with the adapter; without them they are rebuilt from the key


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform init of gain sqrt(2) over ``fan_in = shape[1]``: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), drawn
    from ``generator`` (``nn.init.kaiming_uniform_`` takes a generator too, but its default gain is sqrt(2 / 6))."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The frozen random pair every target reads: ``vera_A`` (r, max d_in) and ``vera_B`` (max d_out, r)."""

    def __init__(self, config: VeRAConfig, max_in: int, max_out: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        a = kaiming_uniform((config.r, max_in), generator)  # drawn first, as PEFT does: B's values depend on it
        b = kaiming_uniform((max_out, config.r), generator)
        self.register_buffer("vera_A", a, persistent=config.save_projection)
        self.register_buffer("vera_B", b, persistent=config.save_projection)


class VeRA(AdapterModule):
    Config = VeRAConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: VeRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.d_in, self.d_out = target.in_features, target.out_features
        self.dropout = dropout(config.dropout)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out))  # b (out,)
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))  # d (r,)

    @classmethod
    def build_shared(cls, config: VeRAConfig, targets: list[Target]) -> nn.Module:
        return Projections(config, max(t.in_features for t in targets), max(t.out_features for t in targets))

    def _a(self) -> Tensor:
        return self.shared.vera_A[:, : self.d_in]  # (r, in)

    def _b(self) -> Tensor:
        return self.shared.vera_B[: self.d_out]  # (out, r)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.vera_lambda_d * F.linear(self.dropout(x), self._a())  # Lambda_d A x: (..., r)
        return y + self.vera_lambda_b * F.linear(h, self._b())  # + Lambda_b B (...): (..., out)

    def delta_weight(self) -> Tensor:
        return (self.vera_lambda_b[:, None] * self._b()) @ (self.vera_lambda_d[:, None] * self._a())  # (out, in)
