"""``lora_b_decay``: STAR's constraint on LoRA, a decoupled weight decay on the up-projection ``B`` only.

Paper: STAR (Zhang et al., ACL Findings 2024, arXiv:2403.01165), Sec. "hybrid regularisation": to keep the
fine-tuned model from becoming over-confident (the poor calibration that misleads uncertainty-based selection), LoRA
is trained with an L2 weight decay on ``B``, and the uncertainty is estimated with Monte-Carlo dropout
(:mod:`vpeft.active.star`). The code (``callanwu/STAR``, ``src/finetuning.py``) gives ``B`` AdamW's decoupled decay
0.5 and ``A`` none, so each optimizer step first shrinks ``B``::

    B <- (1 - lr * lambda) * B,   lambda = 0.5,   then the Adam update

(Loshchilov and Hutter's decoupled decay, ``torch.optim.AdamW``), which keeps ``||B A||`` and hence the update
``(alpha / r) B A`` small. The plug-in sets the decay of every tensor named ``lora_B`` of the active adapter (LoRA and
the methods built on it); the other tensors keep the run's ``optim.weight_decay`` (STAR's code: 0 for ``A``; the
``lm`` recipes' default is 0 as well). It changes the optimiser's parameter groups only (``Plugin.weight_decay``), so
it acts with any optimiser that honours a group's ``weight_decay``; ``adamw`` makes it STAR's decoupled decay.

Default ``weight_decay = 0.5`` (the code's). Departure: none in the rule; the paper's text calls it an "L2 norm"
penalty, the code's decoupled decay is what is implemented (under Adam the two differ: an L2 loss term would be
rescaled by Adam's second moment).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core import MethodConfig, NonNegativeFloat, Plugin, active_adapter, adapted_modules
from ..errors import ConfigError

PARAMETER = "lora_B"


@dataclass
class LoRABDecayConfig(MethodConfig):
    weight_decay: NonNegativeFloat = 0.5  # STAR's code: AdamW weight_decay 0.5 on lora_B


class LoRABDecay(Plugin):
    Config = LoRABDecayConfig

    def __init__(self, model: nn.Module, config: LoRABDecayConfig):
        super().__init__(model, config)
        self.adapter = active_adapter(model)
        if not self._tensors(model):
            raise ConfigError(
                f"plug-in lora_b_decay decays LoRA's up-projection (parameters named {PARAMETER}), and adapter "
                f"{self.adapter!r} has none; use it with lora or a method built on it (dora, pissa...)."
            )

    def _tensors(self, model: nn.Module) -> list[nn.Parameter]:
        return [
            p
            for adapted in adapted_modules(model, self.adapter)
            if not adapted.head
            for part in adapted.parts.values()
            for name, p in part.named_parameters()
            if name.rsplit(".", 1)[-1] == PARAMETER
        ]

    def weight_decay(self, model: nn.Module) -> dict[int, float]:
        return {id(p): self.config.weight_decay for p in self._tensors(model)}
