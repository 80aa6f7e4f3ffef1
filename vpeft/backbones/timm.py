"""timm image encoders: ViT, DeiT, DINOv2, EVA-02, the CLIP towers timm carries, and SAM's ``samvit_*``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import timm.data
from torch import Tensor, nn

from .base import Backbone


class TimmBackbone(Backbone):
    """A timm model with ``blocks`` and ``forward_features`` (its classifier is removed: heads are separate)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no transformer `blocks`; vpeft backbones are ViT-family.")
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.embed_dim = int(model.embed_dim)
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        size = getattr(model.patch_embed, "img_size", None)  # the model's input size, not the checkpoint's
        self.data_config = timm.data.resolve_data_config({"input_size": (3, *size)} if size else {}, model=model)

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def run(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_timm(name: str, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> TimmBackbone:
    """``timm.create_model(name)`` with random weights and no classifier."""
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:5]
        raise ValueError(f"backbone {name!r}: {err}. Close timm names: {close}") from None
    return TimmBackbone(model)
