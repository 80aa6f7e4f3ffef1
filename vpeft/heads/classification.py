"""Classification over any :class:`~vpeft.backbones.Backbone`: pool the final tokens, then one Linear.

``pool``: ``token`` (the class token), ``avg`` (mean of the patch tokens) or ``both`` (the two concatenated, width
2C). A timm model used as is (``tasks.classification``) keeps timm's own head; this module serves the other backbones
and ``both``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbones import POOLS, Backbone
from ..errors import ConfigError


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, pool: str = "token"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"model.head.pool must be one of {POOLS}, got {pool!r}.")
        self.backbone, self.pool = backbone, pool
        width = backbone.out_dim * (2 if pool == "both" else 1)
        self.head = nn.Linear(width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head  # the core trains this as the adapter's head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.pool(self.backbone(x), self.pool))  # (B, num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
