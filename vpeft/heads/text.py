"""Text classification over a Hugging Face language model: pool the last hidden states over the real tokens, then
one Linear (``head``, which the core finds through ``get_classifier`` and trains as the adapter's head).

``pool``: ``mean`` (mean over the tokens the attention mask keeps: sentence encoders such as MiniLM were trained for
it), ``cls`` (the first token: BERT's [CLS]), ``last`` (the last real token, wherever the padding is: a decoder's
only token that has seen the whole text).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones import HFBackbone
from ..errors import ConfigError

TEXT_POOLS = ("mean", "cls", "last")


def pool_tokens(hidden: Tensor, mask: Tensor, pool: str) -> Tensor:
    """(B, N, C) hidden states and the (B, N) attention mask -> (B, C)."""
    if pool == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pool == "cls":
        return hidden[:, 0]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last position the mask keeps (left or right padding)
    return hidden[torch.arange(len(hidden), device=hidden.device), last]


class TextClassifier(nn.Module):
    def __init__(self, backbone: HFBackbone, num_classes: int, pool: str):
        super().__init__()
        if pool not in TEXT_POOLS:
            raise ConfigError(f"model.head.pool must be one of {TEXT_POOLS}, got {pool!r}.")
        self.backbone, self.pool = backbone, pool
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(pool_tokens(hidden, attention_mask, self.pool).to(self.head.weight.dtype))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
