"""TLoRA: transformed low-rank adaptation (Tao, Takida, Murata, Zhao and Mitsufuji, "Transformed Low-rank Adaptation
via Tensor Decomposition and Its Applications to Text-to-image Models", arXiv:2501.08727, 2025; Sony AI / RIKEN AIP).

    W' = T W0 + (alpha / r) B A,    i.e.   y' = T (y - b) + b + (alpha / r) B A dropout(x),   y = W0 x + b
    T[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ... G_d[i_d, j_d]    (a TT matrix; d_out = n_1 ... n_d,
                                                                                 G_k[i, j] a rank x rank matrix)

The paper combines two adaptations: a *transform* adaptation, a full-rank dense matrix applied to the pre-trained
weight and meant to align it with the target weight, so that what is left is closer to low rank; and a *residual*
adaptation that approximates the rest with a compact structure. Both are parametrised by tensor decompositions so
the whole is "ultra parameter-efficient"; DoRA is one instance of transform plus residual (a diagonal transform of
the output rows). Here T (d_out x d_out) is a tensor-train matrix (TTM): d_out is factored into ``transform_cores``
balanced factors n_k, and core ``G_k`` holds ``(rank, n_k, n_k, rank)`` entries (TT rank ``transform_rank``, 1 at
the ends), so T costs ``sum_k rank^2 n_k^2`` parameters instead of d_out^2 yet is dense, and full rank whenever its
Kronecker terms are (``transform_rank=1`` makes T the Kronecker product ``G_1 ⊗ ... ⊗ G_d`` of invertible
factors). T is applied core by core to the output features, never formed in the forward (cost per token about
``d_out * sum_k rank^2 n_k``). The residual is LoRA's ``B A`` (on Conv2d: A a convolution with the base kernel, B a
1x1 convolution, as vpeft's LoRA), which is also a TT matrix with two cores.

Initialisation: the identity path of every core is the identity (``G_k[0, :, :, 0] = I``) and B = 0, so W' = W0 at
initialisation. With a TT rank above 1, the other entries of every core but the last are drawn small and random
(entries that lead back to rank index 0 are zero), the last core's are zero: T stays exactly the identity, and, as
LoRA's B, the zero core gets a gradient at the first step (all-identity cores would be a saddle, since every
non-identity path would then have zero gradient). Merge is exact: ``W' = T W0 + (alpha / r) B A`` with T formed
once; unmerge solves ``T W0 = W' - (alpha / r) B A`` (exact to float rounding; T must stay invertible, which
training does not guarantee, as IA3's scales). The bias is not transformed (DoRA does not rescale it either).

Parameters, ViT-B/16 q and v with the defaults (768 = 24 x 32, TT rank 1, r = 8):
2 * 12 * (24^2 + 32^2 + 8 * (768 + 768)) = 333,312 (LoRA: 294,912).

Sources and choices. What is verified is the abstract (read through the search tool's store of arXiv's HTML page):
transform plus residual, a full-rank dense transform of the pre-trained weight, tensor decompositions for both, DoRA
as a special case, experiments on Stable Diffusion (subject-driven and controllable generation). The method
section and any official code were not reachable here, so vpeft's choices, named as such: the transform acts on the
output side (``T W0``, the side DoRA's magnitude acts on) and is a TTM; the residual is a plain rank-r ``B A``
rather than the paper's compact tensor decomposition of it; the initialisation above; and the defaults (LoRA's
targets q and v, r = 8, alpha = 8, dropout 0.1 on the residual's input; two cores; TT rank 1). Wraps Linear (and
HF Conv1D), fused-projection slices (each slice gets its own transform of its rows) and Conv2d (T mixes output
channels, as a 1x1 convolution would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import PositiveInt, Target
from .lora import LoRA, LoRAConfig


@dataclass
class TLoRAConfig(LoRAConfig):
    """LoRA's options for the residual, and the transform's shape."""

    transform_cores: PositiveInt = 2  # d: the number of TT cores d_out is factored into
    transform_rank: PositiveInt = 1  # TT rank of the transform (1: a Kronecker product of the cores)


def balanced_factors(n: int, count: int) -> list[int]:
    """``count`` factors of ``n`` whose product is ``n``, each the divisor closest to the geometric mean of what is
    left (768, 2 -> [24, 32]; a prime gives [1, ..., n])."""
    factors = []
    for left in range(count, 1, -1):
        target = n ** (1.0 / left)
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        best = min(divisors, key=lambda d: (abs(math.log(d) - math.log(target)), d))
        factors.append(best)
        n //= best
    return sorted([*factors, n])


class TLoRA(LoRA):
    Config = TLoRAConfig
    lora_variant = None  # not a plain LoRA: file converters must not export it as one
    wraps = ("linear", "conv2d")
    mergeable = True

    def __init__(self, target: Target, config: TLoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.__dict__["target"] = target  # unregistered: the bias is read in every forward
        self.dims = balanced_factors(target.out_features, config.transform_cores)
        rank, last = config.transform_rank, len(self.dims) - 1
        self.tlora_cores = nn.ParameterList()
        for k, n in enumerate(self.dims):
            core = torch.zeros(1 if k == 0 else rank, n, n, 1 if k == last else rank)
            if k < last and rank > 1:
                # off the identity path: small and random, except the entries that lead back to rank index 0
                nn.init.normal_(core, std=1.0 / n)
                core[:, :, :, 0] = 0.0
            core[0, :, :, 0] = torch.eye(n)
            self.tlora_cores.append(nn.Parameter(core))

    def transform(self, z: Tensor) -> Tensor:
        """``z T^T`` for ``z`` of shape (..., d_out): the cores contracted one by one into the feature axis."""
        lead = z.shape[:-1]
        z = z.reshape(-1, 1, 1, *self.dims)  # (N, done, rank, j_1..j_d)
        for core in self.tlora_cores:
            n, done, rank = z.shape[0], z.shape[1], z.shape[2]
            z = z.reshape(n, done, rank, core.shape[2], -1)  # (N, done, a, j_k, rest)
            z = torch.einsum("npajr,aijb->npibr", z, core.to(z.dtype))  # (N, done, i_k, b, rest)
            z = z.reshape(n, done * core.shape[1], core.shape[3], -1)  # (N, done', b, rest)
        return z.reshape(*lead, -1)

    def transform_matrix(self) -> Tensor:
        """T (d_out, d_out), formed (for merging and tests)."""
        eye = torch.eye(self.target.out_features, dtype=self.tlora_cores[0].dtype, device=self.tlora_cores[0].device)
        return self.transform(eye).T  # rows of I T^T are the columns of T

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        bias = self.target.weight_and_bias()[1]
        z = y.movedim(1, -1) if self.conv is not None else y  # conv: channels last
        if bias is not None:
            z = self.transform(z - bias.to(z.dtype)) + bias.to(z.dtype)
        else:
            z = self.transform(z)
        z = z.movedim(-1, 1) if self.conv is not None else z
        return super().adapt_output(x, z)  # + (alpha / r) B A dropout(x)

    def residual(self) -> Tensor:
        """``(alpha / r) B A`` in the layout of the base weight."""
        return super().delta_weight()

    def delta_weight(self) -> Tensor:
        raise NotImplementedError("tlora is not additive: use merged()/unmerged() to fold it into the weights")

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        t = self.transform_matrix().to(weight.dtype)
        rotated = (t @ weight.flatten(1)).view(weight.shape)
        return rotated + self.residual().to(weight.dtype), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # solved in float32 at least: there is no half-precision LU, and it would lose the digits the inverse needs
        dtype = torch.promote_types(weight.dtype, torch.float32)
        rest = (weight.to(dtype) - self.residual().to(dtype)).flatten(1)
        return torch.linalg.solve(self.transform_matrix().to(dtype), rest).view(weight.shape).to(weight.dtype), bias
