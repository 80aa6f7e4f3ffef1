"""LoRA: low-rank adaptation (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv:2106.09685).

    h = W0 x + (alpha / r) * B A x,    A in R^{r x d_in} (Kaiming-uniform), B in R^{d_out x r} (zeros)

so the adapted model equals the base model at initialisation, and ``W0 + (alpha / r) B A`` merges exactly.
Defaults are the VTAB-1k leaderboard setting (NOAH lineage): r = 8 on the query and value projections, no extra
scaling (alpha = r) and dropout 0.1 on the LoRA input. On a fused ``qkv`` each of q and v gets its own A and B, so
the key output is untouched: 2 * 12 * 8 * (768 + 768) = 294,912 parameters on ViT-B/16. The adapted slices of one
fused projection are computed together, as the reference code's ``MergedLinear`` (loralib) does: one dropout mask
on x, one matmul with the slices' A stacked, and one with their B placed on their own rows (zeros on the rows of
untouched slices), added onto the base output. HF PEFT likewise draws one dropout mask per LoRA module, so a q,v
adapter exported to it as one rank-2r LoRA on the whole qkv behaves as it does here.
Wraps Linear (and HF Conv1D), fused-projection slices, Conv2d (A is a conv with the base kernel, B a 1x1 conv) and
nn.MultiheadAttention projections (through their merged weights; dropout does not apply there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, Rank, Target
from ._blocks import dropout


@dataclass
class LoRAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "v")
    r: Rank = 8
    alpha: FiniteFloat = 8.0  # the update is scaled by alpha / r
    dropout: DropProbability = 0.1


class LoRA(AdapterModule):
    Config = LoRAConfig
    lora_variant = "lora"
    wraps = ("linear", "conv2d", "mha")
    mergeable = True

    def __init__(self, target: Target, config: LoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        base, r = target.module, config.r
        self.scale = config.alpha / r
        self.dropout = dropout(config.dropout)
        self.conv = None
        if target.kind == "conv2d":
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(
                    f"lora on Conv2d {target.name!r} supports groups=1 and padding_mode='zeros', got "
                    f"groups={base.groups}, padding_mode={base.padding_mode!r}."
                )
            self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size))  # (r, in, kh, kw)
        else:
            self.lora_A = nn.Parameter(torch.empty(r, target.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(target.out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the reference code

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.dropout(x)
        if self.conv is not None:
            h = F.conv2d(x, self.lora_A, **self.conv)  # (B, r, H', W')
            update = F.conv2d(h, self.lora_B[:, :, None, None])
        else:
            update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        # a scale of 1 (the default alpha = r) is exact to skip, and saves a pass over the output each way
        return y + (update if self.scale == 1 else self.scale * update)

    @classmethod
    def adapt_slices(cls, x: Tensor, y: Tensor, parts: dict[str, AdapterModule], slices: dict[str, slice]) -> Tensor:
        """``y + x' A^T B^T`` for all adapted slices at once: ``x'`` is x with one dropout mask, ``A`` the slices' A
        stacked ``(sum r, in)`` and ``B`` ``(out, sum r)`` holds each slice's ``(alpha / r) B`` on its own rows and
        rank columns, zeros elsewhere, so untouched slices get exactly ``+ 0``. Per slice the update equals
        :meth:`adapt_output`'s; only the dropout mask is shared by the slices."""
        if cls.adapt_output is not LoRA.adapt_output:  # a subclass with its own per-slice math (DoRA) keeps it
            return super().adapt_slices(x, y, parts, slices)
        ordered = [parts[p] for p in slices if p in parts]
        h = F.linear(ordered[0].dropout(x), torch.cat([m.lora_A for m in ordered]))  # (..., sum r)
        rank, start, rows = h.shape[-1], 0, []
        for part, cols in slices.items():
            if part in parts:
                m = parts[part]
                r = m.lora_B.shape[1]
                rows.append(F.pad(m.scale * m.lora_B, (start, rank - start - r)))  # (len, sum r)
                start += r
            else:
                rows.append(ordered[0].lora_B.new_zeros(cols.stop - cols.start, rank))
        block_b = torch.cat(rows)  # (out, sum r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, rank), block_b.T)  # (N, out): y + h B^T, one op
        return out.view(y.shape)

    def lora_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scale)`` of the update as it runs outside training; what file converters write (DyLoRA: at its
        evaluation rank)."""
        return self.lora_A, self.lora_B, self.scale

    def delta_weight(self) -> Tensor:
        delta = self.lora_B @ self.lora_A.flatten(1)  # (out, in * kh * kw)
        return self.scale * delta.view(self.lora_B.shape[0], *self.lora_A.shape[1:])
