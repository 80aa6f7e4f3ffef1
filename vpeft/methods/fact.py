"""FacT: factor-tuning (Jie and Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer",
AAAI 2023, arXiv:2212.03145).

Every weight increment of the backbone is a d x d slice of one tensor (q, k, v, proj, and fc1/fc2 as 4 slices each:
12 slices per ViT block), factorised with factors U (r x d, PyTorch Linear init) and V (d x r, zeros) shared by all
layers. A target with ``out = a*d`` and ``in = b*d`` (fc1: a=4, b=1; fc2: a=1, b=4; q/k/v/proj: 1, 1) gets

    delta y = s * (I_a (x) V) dropout(M (I_b (x) U) x),    delta W = s * (I_a (x) V) M (I_b (x) U)    (out x in)

i.e. block (i, j) of ``delta W`` is ``s V M_ij U``, with dropout on the r-dim code after the core, before V (the
official ``dp``, rate 0.1). The (a r x b r) core M is

* FacT-TT (``fact_tt``): a per-target parameter (PyTorch Linear init): 1536 r + 144 r^2 on ViT-B/16, r = 8: 21,504.
* FacT-TK (``fact_tk``): ``M_ij = K_c^T``, ``K_c = C x_3 P[:, c]`` (K_c[u, v] = sum_l C[u, v, l] P[l, c]) from the
  shared core C (r x r x r) and slice factor P (r x 12L), both Xavier-uniform; slice c = col + i*b + j, the columns
  given in block order q, k, v, proj, fc1 (4), fc2 (4) as in the official ``idx`` counter: 1680 r + r^3 on
  ViT-B/16, r = 32: 86,528.

Where this follows the paper against the official code (``FacT/fact_tk.py``): the code flattens fc1's core as
(j, k) -> 4 j + k but splits its output as (chunk, code), and applies fc2's core transposed (U-side on the second
mode of C); here every slice uses the paper's single contraction ``V K_c^T U``. Both are re-parameterisations of
the same model family and give the same parameter count.

Defaults (``FacT/configs/{tt,tk}/<task>.yaml``, keys rank/scale; most common value over the 19 VTAB-1k tasks):
TT r = 8, s = 1 (per task r/s: cifar 8/1, caltech101 16/10, dtd 8/0.01, flowers 16/1, pets 8/1, svhn 16/100,
sun397 8/1, camelyon 8/10, eurosat 8/100, resisc45 8/0.1, retinopathy 8/1, clevr_count 16/1, clevr_dist 4/10,
dmlab 16/10, kitti 16/10, dsprites_loc 16/100, dsprites_ori 16/1, smallnorb_azi 16/100, smallnorb_ele 8/10);
TK r = 32, s = 10 (cifar 32/0.1, caltech101 32/10, dtd 16/0.01, flowers 32/1, pets 16/10, svhn 32/100, sun397 16/1,
camelyon 32/10, eurosat 32/100, resisc45 32/10, retinopathy 16/1, clevr_count 32/10, clevr_dist 16/10, dmlab 32/10,
kitti 32/10, dsprites_loc 32/100, dsprites_ori 32/1, smallnorb_azi 32/100, smallnorb_ele 16/10).
Mergeable (``delta_weight``); dropout is the identity in eval mode. The width d is the smallest in/out width among
the targets (768 on ViT-B); every target's widths must be multiples of it. The q, k, v slices of a fused qkv are
computed together (``adapt_slices``): one code ``x U^T`` for the three, their cores stacked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, Rank, Target
from ._blocks import dropout

_DEFAULT_TARGETS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")  # roles: attn.qkv[q,k,v], attn.proj, mlp.fc1/2


@dataclass
class FacTTTConfig(MethodConfig):
    targets: tuple[str, ...] = _DEFAULT_TARGETS
    r: Rank = 8
    scale: FiniteFloat = 1.0  # s
    dropout: DropProbability = 0.1


@dataclass
class FacTTKConfig(FacTTTConfig):
    r: Rank = 32
    scale: FiniteFloat = 10.0


class FacTShared(nn.Module):
    """U, V (and for TK the core C and slice factor P), plus each target's block layout and first slice column."""

    def __init__(self, config: FacTTTConfig, targets: list[Target], tk: bool):
        super().__init__()
        d = min(min(t.in_features, t.out_features) for t in targets)
        self.layout: dict[str, tuple[int, int, int]] = {}  # target key -> (a, b, first column)
        col = 0
        for t in sorted(targets, key=lambda t: (-1 if t.index is None else t.index, t.position)):  # block order
            if t.in_features % d or t.out_features % d:
                name = "fact_tk" if tk else "fact_tt"
                raise ValueError(
                    f"{name}: {t.key!r} is {t.in_features} -> {t.out_features}; FacT needs widths "
                    f"that are multiples of the shared d={d}."
                )
            a, b = t.out_features // d, t.in_features // d
            self.layout[t.key] = (a, b, col)
            col += a * b
        r = config.r
        self.U = nn.Parameter(torch.empty(r, d))  # (r, d)
        self.V = nn.Parameter(torch.zeros(d, r))  # (d, r)
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))  # nn.Linear(d, r)'s init, as the official FacTu
        if tk:
            self.C = nn.Parameter(torch.empty(r, r, r))  # (u, v, l)
            self.P = nn.Parameter(torch.empty(r, col))  # (l, slice)
            nn.init.xavier_uniform_(self.C)
            nn.init.xavier_uniform_(self.P)


class FacTTT(AdapterModule):
    Config = FacTTTConfig
    wraps = ("linear",)
    mergeable = True
    tk: bool = False

    def __init__(self, target: Target, config: FacTTTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.a, self.b, self.col = shared.layout[target.key]
        self.scale = config.scale
        self.dropout = dropout(config.dropout)
        if not self.tk:
            r = config.r
            self.core = nn.Parameter(torch.empty(self.a * r, self.b * r))  # (a r, b r), a Linear(b r, a r) weight
            nn.init.kaiming_uniform_(self.core, a=math.sqrt(5))

    @classmethod
    def build_shared(cls, config: FacTTTConfig, targets: list[Target]) -> nn.Module:
        return FacTShared(config, targets, cls.tk)

    def core_matrix(self) -> Tensor:
        """The (a r x b r) core M; block (i, j) maps the code of input chunk j to the code of output chunk i."""
        if not self.tk:
            return self.core
        a, b, sh = self.a, self.b, self.shared
        K = sh.C @ sh.P[:, self.col : self.col + a * b]  # (u, v, a*b): K[:, :, c] = sum_l C[:, :, l] P[l, c]
        Mt = K.permute(2, 1, 0).unflatten(0, (a, b))  # (a, b, v, u): block (i, j) is K_c^T, c = i*b + j
        return Mt.permute(0, 2, 1, 3).flatten(2).flatten(0, 1)  # (a, v, b, u) -> (a r, b r)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        U, V = self.shared.U, self.shared.V
        code = (x.unflatten(-1, (self.b, -1)) @ U.T).flatten(-2)  # (..., b*d) -> (..., b, d) -> (..., b*r)
        code = self.dropout(code @ self.core_matrix().T)  # (..., a*r)
        delta = (code.unflatten(-1, (self.a, -1)) @ V.T).flatten(-2)  # (..., a, r) -> (..., a, d) -> (..., a*d)
        return torch.add(y, delta, alpha=self.scale)  # y + s * delta in one pass over the output

    @classmethod
    def adapt_slices(cls, x: Tensor, y: Tensor, parts: dict[str, AdapterModule], slices: dict[str, slice]) -> Tensor:
        """The q/k/v slices of a fused projection as one target with ``a`` = number of slices, ``b = 1``: they
        share U, V and the scale, so one code ``x U^T``, their cores stacked (zeros for a slice not adapted), one
        dropout on the stacked code (element-wise, so it draws as the per-slice calls do) and one V product."""
        ordered = list(parts.values())
        width = ordered[0].shared.U.shape[1]
        if any(m.a != 1 or m.b != 1 for m in ordered) or any(s.stop - s.start != width for s in slices.values()):
            return super().adapt_slices(x, y, parts, slices)
        U, V = ordered[0].shared.U, ordered[0].shared.V
        r = U.shape[0]
        cores = [parts[p].core_matrix() if p in parts else U.new_zeros(r, r) for p in slices]  # (r, r) each
        code = ordered[0].dropout((x @ U.T) @ torch.cat(cores).T)  # (..., n*r)
        delta = (code.unflatten(-1, (len(cores), r)) @ V.T).flatten(-2)  # (..., n, r) -> (..., n, d) -> (..., n*d)
        return torch.add(y, delta, alpha=ordered[0].scale)

    def delta_weight(self) -> Tensor:
        U, V = self.shared.U, self.shared.V
        r = U.shape[0]
        M = self.core_matrix().view(self.a, r, self.b, r)  # (i, v, j, u)
        delta = torch.einsum("ov,ivju,un->iojn", V, M, U)  # (a, d, b, d): block (i, j) is V M_ij U
        return self.scale * delta.reshape(self.a * V.shape[0], self.b * U.shape[1])  # (out, in)


class FacTTK(FacTTT):
    Config = FacTTKConfig
    tk = True
