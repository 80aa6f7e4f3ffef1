"""PEQA: parameter-efficient and quantisation-aware adaptation (Kim et al., "Memory-Efficient Fine-Tuning of
Compressed Large Language Models via sub-4-bit Integer Quantization", NeurIPS 2023, arXiv:2305.14152).

Each target weight is quantised once, round-to-nearest, to ``b``-bit unsigned integers with a scale and zero point
per output channel (or per group of ``group_size`` input columns):

    W_hat = s (W_bar - z),    W_bar = clamp(round(W0 / s0) + z, 0, 2^b - 1),    s0 = (max - min) / (2^b - 1)

(eq. 2 of the paper; min and max over the row or group, widened to hold 0, and ``z = round(-min / s0)``: GPTQ's
asymmetric grid). ``W_bar`` and ``z`` are frozen; only the scales ``s`` train, from ``s0`` (eq. 3: ``s0 + delta s``),
so the trainable count is the number of scale groups, ``out * in / group_size`` a layer. The codes are held packed
(``uint8``, two 4-bit codes a byte) and the layer's full-precision weight is freed (a released base,
vpeft/core/layers.py): ``disabled()`` is the frozen round-to-nearest model (scales ``s0``), merge writes
``s (W_bar - z)``. The saved adapter holds the scales only: the codes are the deterministic RTN of the
full-precision weights, rebuilt at load. ``train_scales=False`` keeps ``s = s0`` frozen: the quantised model as it
is, the "frozen quantised" reference a PEQA run is compared with.

Headline defaults: 4 bits, per output channel (the paper's main setting; its grouped scales are ``group_size``),
every Linear of every block (its targets: all linear layers, as the paper quantises the whole
model; the embeddings and the output layer stay in full precision, as there). Departures: OPTQ (GPTQ) as the
initial quantiser, which the paper also uses, is not offered (RTN only, which needs no calibration data); the scale
update is done through a backward that rebuilds each layer's dequantised weight rather than keeping it (the paper's
point is the memory of the frozen base; this keeps the step's memory near one layer's weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import MethodConfig, PositiveInt, Target
from ._quant import Bits, PackedBase, groups_of, minmax_grid


@dataclass
class PEQAConfig(MethodConfig):
    targets: tuple[str, ...] = ("in_block",)
    bits: Bits = 4
    group_size: PositiveInt | None = None  # None: one scale per output channel
    train_scales: bool = True  # False: the frozen quantised model (scales stay at their RTN values)


class PEQA(PackedBase):
    Config = PEQAConfig

    def __init__(self, target: Target, config: PEQAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        groups = groups_of(weight.shape[1], config.group_size, "peqa", target.key)
        scale, zero, codes = minmax_grid(weight, config.bits, groups)
        self.store(target, codes, config.bits)
        self.register_buffer("zero", zero.to(torch.uint8), persistent=False)  # (out, groups), rebuilt at load
        self.register_buffer("scale0", scale.to(weight.dtype), persistent=False)  # s0, what disabled() runs
        scales = scale.to(weight.dtype).clone()
        if config.train_scales:
            self.scales = nn.Parameter(scales)  # (out, groups): the only trainable tensor
        else:
            self.register_buffer("scales", scales)

    def dequantised(self, scales: Tensor) -> Tensor:
        out, width = self.shape
        levels = self.unpacked().view(out, scales.shape[1], -1).to(scales.dtype) - self.zero[..., None]
        return (scales[..., None] * levels).view(out, width)

    def state(self, initial: bool) -> tuple[Tensor, ...]:
        return (self.scale0 if initial else self.scales,)
