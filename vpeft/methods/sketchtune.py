"""SketchTune: fine-tunable sketches (Zhang et al., "Sketch to Adapt: Fine-Tunable Sketches for Efficient LLM
Adaptation", ICML 2025, arXiv:2410.06364; official code ``LeanModels/SketchTune``, ``tailor_utils.py``).

Each target weight is compressed into a sketch: per row (and per group of ``group_size`` input columns) a codebook
of ``2^b`` values ``G[i, grp(j), :]`` and a frozen ``b``-bit code ``c_ij`` per weight,

    W_ij = G[i, grp(j), c_ij]

Fine-tuning trains the codebooks only (the official ``quant_grid``): ``dL/dG[i, g, k] = sum_{j in g: c_ij = k}
dL/dW_ij``, the scatter-add of the weight gradient by code, which is what autograd's ``gather`` backward computes
here (the official code has CUDA gather and scatter-add kernels, ``Sub4BitMatMul``). The codes are held packed
(``uint8``, two 4-bit codes a byte) and the layer's full-precision weight is freed (a released base,
vpeft/core/layers.py): ``disabled()`` computes with the codebooks as sketched, merge writes the gathered weight.
The saved adapter holds the codebooks (as the official ``save_pretrained`` saves ``quant_grids`` only); the codes
are rebuilt from the full-precision weights at load, deterministically.

Headline defaults: 4 bits, one codebook per row (the official ``Sub4BitLinear`` turns a 2-D grid into one group a
row), every Linear of every block. Departure: the official sketches are data-aware (a Hessian-weighted compression
from calibration data, LeanQuant-style; the released sketched models are downloaded, not made by the repository).
Here a sketch is made without data: a 1-D k-means (Lloyd's algorithm, ``iterations`` rounds from the ``2^b``
quantiles of the row) on each row group's weights, which minimises the unweighted squared error of the sketch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import MethodConfig, NonNegativeInt, PositiveInt, Target
from ._quant import Bits, PackedBase, groups_of


@dataclass
class SketchTuneConfig(MethodConfig):
    targets: tuple[str, ...] = ("in_block",)
    bits: Bits = 4
    group_size: PositiveInt | None = None  # None: one codebook per row
    iterations: NonNegativeInt = 10  # Lloyd rounds of the sketch


def sketch(weight: Tensor, bits: int, groups: int, iterations: int) -> tuple[Tensor, Tensor]:
    """``(codebooks (out, groups, 2^b), codes (out, in))``: each row group's 1-D k-means, computed in float32 (a
    float64 model gets the sketch of its float32 twin), centroids kept sorted so each code is a nearest centroid."""
    out, k = weight.shape[0], 1 << bits
    w = weight.detach().float().reshape(out * groups, -1).contiguous()  # (M, g)
    width = w.shape[1]
    quantiles = ((torch.arange(k, dtype=torch.float64) + 0.5) * width / k).long().clamp(max=width - 1)
    centres = w.sort(-1).values[:, quantiles.to(w.device)]  # (M, k), ascending

    def nearest(c: Tensor) -> Tensor:
        return torch.searchsorted((c[:, 1:] + c[:, :-1]) / 2, w)  # sorted centres: nearest by the midpoints

    for _ in range(iterations):
        codes = nearest(centres)
        sums = torch.zeros_like(centres).scatter_add_(1, codes, w)
        counts = torch.zeros_like(centres).scatter_add_(1, codes, torch.ones_like(w))
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres).sort(-1).values  # empty: kept
    return centres.view(out, groups, k), nearest(centres).view(weight.shape)


class SketchTune(PackedBase):
    Config = SketchTuneConfig

    def __init__(self, target: Target, config: SketchTuneConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        groups = groups_of(weight.shape[1], config.group_size, "sketchtune", target.key)
        codebook, codes = sketch(weight, config.bits, groups, config.iterations)
        self.store(target, codes, config.bits)
        self.register_buffer("codebook0", codebook.to(weight.dtype), persistent=False)  # what disabled() runs
        self.codebook = nn.Parameter(codebook.to(weight.dtype).clone())  # (out, groups, 2^b): the trainable sketch

    def dequantised(self, codebook: Tensor) -> Tensor:
        out, width = self.shape
        codes = self.unpacked().view(out, codebook.shape[1], -1).long()
        return torch.gather(codebook, -1, codes).view(out, width)  # backward: scatter-add of dL/dW by code

    def state(self, initial: bool) -> tuple[Tensor, ...]:
        return (self.codebook0 if initial else self.codebook,)
