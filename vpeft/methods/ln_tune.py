"""LN-tune: tune only the LayerNorm affine parameters (the "LayerNorm tuning" baseline of VTAB-1k tables, e.g.
PETL_Vision's ``ln`` flag, 0.038M; see also Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning", ICLR 2024, arXiv:2312.11420).

    y = (g + dg) * xhat + (b + db) = LN(x) + dg * xhat + db,    xhat = (x - mean) / sqrt(var + eps)

Training ``dg``/``db`` (zero at init) with the pretrained ``g``/``b`` frozen is the baseline's update written as a
delta, so the base model survives (disable, unmerge) and the adapted model equals the base one at initialisation.
``xhat`` is recomputed with ``F.layer_norm(x, shape, None, None, eps)`` rather than read back as ``(y - b) / g``,
which would be unstable where ``g`` is near zero. Mergeable and exact: ``g' = g + dg``, ``b' = b + db``.
Targets are every LayerNorm outside the head: on ViT-B/16 ``norm1`` and ``norm2`` of 12 blocks plus the final
``norm``, 25 * 2 * 768 = 38,400 parameters. A LayerNorm without a bias gets only ``dg``; one without an affine
weight is skipped.

RMS norms (Llama, Mistral, Qwen, Gemma: ``y = g * x / rms(x)``, no mean and no bias) are what LayerNorm tuning tunes
in those models (Zhao et al. tune the norms of LLaMA-based Vicuna), so they are targets too: ``y + dg * xhat`` with
``xhat = x / sqrt(mean(x^2) + eps)`` computed in float32 as Hugging Face's norms do; ``g' = g + dg`` merges exactly
(also for Gemma's ``(1 + g) * xhat``, whose slope in ``g`` is one as well). On SmolLM2-135M: 61 norms, 35,136
parameters. The class names of model libraries' own RMS norms are listed in ``target_types``; another one is named
there (``target_types=("MyRMSNorm",)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, Target

# torch's, timm's and Hugging Face's RMS norms of the common decoder families (each library defines its own class)
RMS_NORMS = ("RMSNorm", "RmsNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "GemmaRMSNorm",
             "Gemma2RMSNorm", "Gemma3RMSNorm", "OlmoRMSNorm", "Olmo2RMSNorm", "Phi3RMSNorm")  # fmt: skip


@dataclass
class LNTuneConfig(MethodConfig):
    target_types: tuple[str, ...] = ("LayerNorm", *RMS_NORMS)


class LNTune(AdapterModule):
    Config = LNTuneConfig
    wraps = ("norm",)
    mergeable = True

    def __init__(self, target: Target, config: LNTuneConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        norm = target.module
        self.rms = not isinstance(norm, nn.LayerNorm)
        self.shape = tuple(norm.weight.shape)
        # Hugging Face names it variance_epsilon; None (nn.RMSNorm's default) is torch's default there too
        self.eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        self.weight_delta = nn.Parameter(torch.zeros(self.shape))  # dg, shaped like the norm's weight
        has_bias = getattr(norm, "bias", None) is not None
        self.bias_delta = nn.Parameter(torch.zeros(self.shape)) if has_bias else None  # db

    @classmethod
    def accepts(cls, target: Target, config: LNTuneConfig) -> bool:
        """LayerNorms and RMS norms with an affine weight (the weight is what it tunes)."""
        m = target.module
        rms_or_layer = target.kind == "norm" and not isinstance(m, (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d))
        return rms_or_layer and getattr(m, "weight", None) is not None

    def normalised(self, x: Tensor) -> Tensor:
        """``xhat``: the input normalised without the affine part."""
        if self.rms:
            return F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)
        return F.layer_norm(x, self.shape, None, None, self.eps)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        xhat = self.normalised(x)
        y = y + self.weight_delta * xhat
        return y + self.bias_delta if self.bias_delta is not None else y

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_b = bias + self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias
        return weight + self.weight_delta.to(weight.dtype), new_b

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_b = bias - self.bias_delta.to(bias.dtype) if self.bias_delta is not None else bias
        return weight - self.weight_delta.to(weight.dtype), new_b
