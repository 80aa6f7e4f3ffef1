"""SNELL: sparse tuning with kernelized LoRA (Shen, Sun, Ji, Huang and Wang, "Expanding Sparse Tuning for Low Memory
Usage", NeurIPS 2024, arXiv:2411.01800; official code ``ssfgunner/SNELL``, ``model/vision_transformer_timm.py``).

    K_ij = c * sum_{h=1..H} (-1)^(h-1) || b_i^(h) - a_j^(h) ||_p          (the kernelised merge of two low-rank factors)
    Delta W = K ⊙ sg(|K|) ⊙ 1[ |K| > t_s ],   t_s = the s-quantile of |K|   (competition-based sparsification)
    h = W0 x + Delta W dropout(x)

``a_j^(h)`` (row j of ``A_h``, ``A in R^{H x d_in x r/H}``) and ``b_i^(h)`` (``B in R^{H x d_out x r/H}``) are the
low-rank factors, split into H groups of r/H columns. LoRA merges its factors with the linear kernel,
``(B A^T)_ij = <b_i, a_j>``, so its update has rank <= r; SNELL merges them with a non-linear kernel, here the official
code's: signed sums of distances between the factors' rows, a kernel whose matrix has full rank for generic factors,
so r/H-dimensional factors give an update of any rank (the paper's point: sparse tuning needs a high-rank update
that low-rank storage cannot give linearly). Sparsification is "competition": every entry whose magnitude is not
above the s-quantile of all |K| is zeroed, at every forward, so which weights are tuned is decided end to end by the
factors and changes during training, and no index of tunable weights is stored. The surviving entries are
multiplied by their own detached magnitude (``sg`` = stop-gradient), as the official ``SNELL.sparsify`` does
(``weight * F.threshold(weight.detach().abs(), quantile, 0)``): the gradient reaching entry ij is scaled by |K_ij|,
so larger weights learn faster and the survivors win the competition. ``s = 0`` is the official code's KLoRA branch,
the kernel matrix alone (``Delta W = K``, nothing zeroed, no magnitude factor).

Memory. Only the factors are parameters: ``r (d_in + d_out)`` per target (LoRA's count), so the optimizer keeps
LoRA's state. The dense ``(d_out, d_in)`` kernel matrix exists only inside the forward and backward of one layer:
with ``checkpoint=True`` (the official code's ``torch.utils.checkpoint`` around the layer) it is not kept between
them but recomputed in backward, so a training step holds one layer's dense matrices at a time instead of every
layer's. A dense sparse tuning (a full-size trainable delta with a mask) keeps, per layer, the delta, its gradient
and two Adam moments. ``V-PEFT-Bench/perf/snell_memory.py`` measures both (results in
``V-PEFT-Bench/perf/results/cpu-snell-memory.md``).

Parameters: ViT-B/16 with the defaults (q, k, v, attention output, MLP in and out; r = 32):
12 * 32 * (4 * (768 + 768) + 2 * (768 + 3072)) = 5,308,416.

Defaults are the official VTAB-1k scripts' (``scripts/vtab/snell32``): r = 32 (``low_rank_dim``), H = 2 groups,
the Euclidean distance (``norm_p=2``), c = 0.1 (``SCALE_FACTOR_fc``), dropout 0.1 on the branch input, factors
Kaiming-uniform as nn.Linear's (``a = sqrt(5)``, fan-in over the trailing dimensions of each 3-D factor, as torch
computes it for the official tensors); the sparsity ratio s is tuned per task there (0 to 0.995); the default here,
0.4, is the median of its 19 VTAB-1k scripts.

Departures. The official code takes the threshold with ``torch.quantile``, which refuses tensors of more than 2^24
entries (a 4096 x 11008 MLP); here the threshold is the order statistic ``kthvalue(floor(s (N - 1)) + 1)`` of |K|,
which keeps exactly the entries that are above the interpolated quantile (the test checks the two agree). It also
applies DropPath(0.1) to each update and no dropout on the attention output's input; here every target's input gets
``dropout`` and there is no drop path. The paper's later SNELLA variant (learnable kernel sharpness, layer-wise
sparsity allocation) is not included. The paper evaluates vision models only; the method is a Linear-level
parametrisation, so it also runs on language models here. Wraps Linear (and HF Conv1D) and fused-projection slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core import AdapterModule, DropProbability, MethodConfig, PositiveFloat, PositiveInt, Target
from ..errors import OptionError
from ._blocks import dropout


@dataclass
class SNELLConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    r: PositiveInt = 32  # width of each factor (the official low_rank_dim), split into `heads` groups
    heads: PositiveInt = 2  # H: kernel terms, with alternating signs
    sparsity: DropProbability = 0.4  # s: the share of the kernel matrix's entries zeroed, in [0, 1)
    scale: PositiveFloat = 0.1  # c: the kernel's coefficient (official SCALE_FACTOR_fc)
    p: PositiveFloat = 2.0  # the distance's norm (official norm_p)
    dropout: DropProbability = 0.1  # on the input of the branch
    checkpoint: bool = True  # recompute the kernel matrix in backward instead of keeping it (the official code's)

    def check(self) -> None:
        if self.r % self.heads:
            raise OptionError(
                f"snell option r={self.r} must be a multiple of heads={self.heads}: each of the {self.heads} kernel "
                f"terms reads r / heads columns of the factors. Use r = {self.heads * max(1, self.r // self.heads)}.",
                "r",
            )


def kept_mask(magnitude: Tensor, sparsity: float) -> Tensor:
    """``magnitude > t`` where t is the ``sparsity``-quantile of ``magnitude`` (linear interpolation, as
    ``torch.quantile``): the entries strictly above the order statistic of rank ``floor(s (N - 1))``, which are the
    same entries, found with ``kthvalue`` (no size limit)."""
    flat = magnitude.flatten()
    k = math.floor(sparsity * (flat.numel() - 1)) + 1  # 1-based
    return magnitude > flat.kthvalue(k).values


class SNELL(AdapterModule):
    Config = SNELLConfig
    wraps = ("linear",)
    mergeable = True
    identity_at_init = False  # both factors are random: Delta W is small but not zero (as in the official code)

    def __init__(self, target: Target, config: SNELLConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        width = config.r // config.heads
        self.sparsity, self.p, self.use_checkpoint = config.sparsity, config.p, config.checkpoint
        self.dropout = dropout(config.dropout)
        self.snell_A = nn.Parameter(torch.empty(config.heads, target.in_features, width))  # (H, in, r/H)
        self.snell_B = nn.Parameter(torch.empty(config.heads, target.out_features, width))  # (H, out, r/H)
        nn.init.kaiming_uniform_(self.snell_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.snell_B, a=math.sqrt(5))
        # c (-1)^h as Python floats, not a buffer: model.to(bfloat16) would round c = 0.1 to 0.10009765625
        self.coeff = [config.scale * (-1.0) ** h for h in range(config.heads)]

    def kernel(self) -> Tensor:
        """``K`` (out, in): ``sum_h coeff_h * ||b_i^(h) - a_j^(h)||_p``, in float32 at least (``cdist`` has no
        half-precision CPU kernel, and the quantile of a half-precision matrix would tie many entries)."""
        dtype = torch.promote_types(self.snell_A.dtype, torch.float32)
        dist = torch.cdist(self.snell_B.to(dtype), self.snell_A.to(dtype), p=self.p)  # (H, out, in)
        return torch.einsum("h,hoi->oi", dist.new_tensor(self.coeff), dist)

    def delta_weight(self) -> Tensor:
        """``Delta W`` (out, in): the kernel matrix sparsified by competition."""
        k = self.kernel()
        if self.sparsity == 0:
            return k  # the official KLoRA branch: no sparsification
        magnitude = k.detach().abs()
        return k * torch.where(kept_mask(magnitude, self.sparsity), magnitude, 0.0)

    def _update(self, x: Tensor) -> Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.dropout(x)
        if self.use_checkpoint and torch.is_grad_enabled() and self.snell_A.requires_grad:
            # no dense (out, in) tensor is kept for backward: it is recomputed there from the factors
            return y + checkpoint(self._update, x, use_reentrant=False)
        return y + self._update(x)
