"""FFA-LoRA: federated freeze-A LoRA (Sun, Li, Li and Ding, "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024, arXiv:2403.12313).

    h = W0 x + (alpha / r) B A0 x,    A0 frozen at its random init, B (zeros) the only trained factor

LoRA's math (one mechanism: this class is :class:`~vpeft.methods.lora.LoRA` with ``lora_A`` held as a buffer, so it
never trains and is saved with the adapter). Because the update is linear in B, averaging client adapters is exact
in federated learning: clients that start from the same A0 and train B_k give ``mean_k (s B_k A0) = s (mean_k B_k)
A0``, so the server's averaged adapter is the average of the client updates, with no cross terms (for LoRA,
``mean B_k A_k != mean B_k mean A_k``). The loss is also linear in B, which the paper shows keeps DP-SGD noise from
being amplified, and the result insensitive to alpha. Half of LoRA's trainable parameters: ``r * d_out`` per target
(12 * 2 * 8 * 768 = 147,456 on ViT-B/16 q and v).

Defaults: LoRA's (r = 8 on q and v, the rank of the paper's RoBERTa experiments; alpha = r, dropout 0.1). The paper
reports FFA-LoRA stable over a wide range of alpha; its per-task alpha and learning rates are not reproduced here.
A0 is drawn as LoRA's A (Kaiming-uniform, nn.Linear's init); the paper only asks for a random non-zero init. The
federated loop and DP-SGD are recipes outside this layer. Exports to Hugging Face PEFT as a plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core import Target
from .lora import LoRA, LoRAConfig


@dataclass
class FFALoRAConfig(LoRAConfig):
    """LoRA's options: the rank, its scaling, dropout and the targets."""


class FFALoRA(LoRA):
    Config = FFALoRAConfig

    def __init__(self, target: Target, config: FFALoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        a0 = self.lora_A.detach()
        del self.lora_A  # a buffer under the same name: LoRA's math and file keys unchanged, no gradient ever
        self.register_buffer("lora_A", a0)
