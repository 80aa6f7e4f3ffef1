"""S2-LoRA: sparsely shared LoRA (Liu, Qin, Peng and Lee, "Sparsely Shared LoRA on Whisper for Child Speech
Recognition", ICASSP 2024, arXiv:2309.11756).

    h_l = W0_l x + (alpha / r) B diag(lambda_l) A x,    A in R^{r x d_in}, B in R^{d_out x r} shared by every target
                                                          of one shape; lambda_l in R^r per target, L1-penalised

The two low-rank factors are shared globally; each adapted weight keeps only its rank coefficients ``lambda_l``, a
diagonal between them (the learnable rank coefficient the paper takes from AdaLoRA's ``P Lambda Q``), pushed towards
sparsity by an L1 penalty, so each weight uses a few of the shared rank-one directions: the paper finds the learned
pattern close to AdaLoRA's rank allocation. Sharing is by weight shape (``(d_out, d_in)``): targets of one shape read
one pair (ViT-B/16 q and v: one 768 x 768 pair; Llama's narrower grouped k/v get a pair of their own). Parameters:
``r (d_in + d_out)`` per shape plus ``r`` per target; ViT-B/16 q and v at r = 8: 8 * (768 + 768) + 24 * 8 = 12,480
(LoRA: 294,912). ``lambda`` starts at zero, so the adapted model equals the base model at initialisation, and
``W0 + (alpha / r) B diag(lambda) A`` merges exactly.

The penalty is ``sparsity * sum_l ||lambda_l||_1`` over the adapter's targets, added to the task loss (the method's
``loss``); ``sparsity=0`` turns it off.

Sources and choices (checked in session 7 against what could be reached). Verified against the paper's abstract and
the opening of its introduction (arXiv:2309.11756v2 HTML, read through the search tool's stored copy; also the
sciencestack.ai digest): only reparametrisations that add no inference cost are studied (so the update must merge,
as here); LoRA and AdaLoRA are compared and AdaLoRA's "learnable rank coefficient is a good design"; in S2-LoRA "the
two low-rank decomposed matrices are globally shared" and "each weight matrix only has to maintain its specific rank
coefficients that are constrained to be sparse"; the trainable share is about 0.02% of Whisper's parameters; the
learned rank pattern resembles AdaLoRA's allocation. ``Delta W_l = B Lambda_l A`` with shared A, B and a sparse
per-weight diagonal ``Lambda_l`` matches every one of these statements, so the equation stands. Not verified, because
the method section was not reachable (the stored copies hold only the opening of each page) and the paper has no
public code: how "globally" the pair is shared across weights of different shapes (here one pair per shape, the
only sharing that needs no padding), how sparsity is imposed (here an L1 penalty, weight 1e-4, with no pruning
schedule and no AdaLoRA orthogonality term), the initialisation (A and B drawn as nn.Linear's weights,
Kaiming-uniform, ``lambda = 0`` so the start is the identity and random factors give ``lambda`` a gradient at the
first step, as AdaLoRA's zero-initialised ``Lambda`` between random ``P``, ``Q``) and the ``alpha / r`` scale
(LoRA's): all vpeft's. Defaults: r = 8 on q and v, alpha = 8, dropout 0.1, as vpeft's LoRA.
Wraps Linear (and HF Conv1D) and fused-projection slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, NonNegativeFloat, Rank, Target
from ._blocks import dropout


@dataclass
class S2LoRAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: Rank = 8  # rank of the shared pairs: the number of directions every target chooses from
    alpha: FiniteFloat = 8.0  # the update is scaled by alpha / r
    dropout: DropProbability = 0.1  # on the input of the branch
    sparsity: NonNegativeFloat = 1e-4  # weight of the L1 penalty on every target's rank coefficients


def shape_key(target: Target) -> str:
    return f"{target.out_features}x{target.in_features}"


class SharedPairs(nn.Module):
    """One trainable pair per target shape ``OxI``: ``A_OxI`` (r, I) and ``B_OxI`` (O, r)."""

    def __init__(self, config: S2LoRAConfig, targets: list[Target]):
        super().__init__()
        for target in targets:
            key = shape_key(target)
            if hasattr(self, f"A_{key}"):
                continue
            a = nn.Parameter(torch.empty(config.r, target.in_features))  # (r, in)
            b = nn.Parameter(torch.empty(target.out_features, config.r))  # (out, r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r)'s init
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(r, out)'s init
            self.register_parameter(f"A_{key}", a)
            self.register_parameter(f"B_{key}", b)


class S2LoRA(AdapterModule):
    Config = S2LoRAConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: S2LoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.key = shape_key(target)
        self.scale = config.alpha / config.r
        self.dropout = dropout(config.dropout)
        self.s2_lambda = nn.Parameter(torch.zeros(config.r))  # (r,): zeros, the identity at init

    @classmethod
    def build_shared(cls, config: S2LoRAConfig, targets: list[Target]) -> nn.Module:
        return SharedPairs(config, targets)

    def pair(self) -> tuple[Tensor, Tensor]:
        return getattr(self.shared, f"A_{self.key}"), getattr(self.shared, f"B_{self.key}")

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        a, b = self.pair()
        h = F.linear(self.dropout(x), a) * self.s2_lambda  # diag(lambda) A x: (..., r)
        return y + self.scale * F.linear(h, b)

    def delta_weight(self) -> Tensor:
        a, b = self.pair()
        return self.scale * (b * self.s2_lambda) @ a  # (out, in)

    @classmethod
    def loss(cls, config: S2LoRAConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        if config.sparsity == 0 or not layers:
            return None
        return config.sparsity * torch.stack([layer.s2_lambda.abs().sum() for layer in layers]).sum()
