"""timm image encoders: ViT, DeiT, DINOv2, EVA-02, the CLIP towers timm carries, and SAM's ``samvit_*``.

The name is timm's, with an optional pretrained tag (``vit_base_patch16_clip_224.openai``): the tag picks timm's
pretrained configuration (mean, std, input size), never a download. ``forward`` is timm's ``forward_features``: the
tokens after the final norm (B, N, C), or for ``samvit_*`` the neck's (B, 256, h, w) map.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import timm.data
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Backbone


class TimmBackbone(Backbone):
    """A timm model with ``blocks`` and ``forward_features`` (its classifier is removed: heads are separate)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if not isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
            raise ConfigError(f"{type(model).__name__} has no transformer `blocks`; vpeft backbones are ViT-family.")
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.embed_dim = int(model.embed_dim)
        self._out_dim = int(getattr(model, "num_features", model.embed_dim))  # samvit: the neck's channels
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        size = getattr(model.patch_embed, "img_size", None)  # the model's input size, not the checkpoint's
        if getattr(model.patch_embed, "strict_img_size", False):  # no run-time resampling of the position embedding
            self.input_size = (int(size[0]), int(size[1]))
        self.data_config = timm.data.resolve_data_config({"input_size": (3, *size)} if size else {}, model=model)

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def run(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def check_timm_name(name: str, what: str = "timm backbone") -> None:
    """Refuse a hub tag or a name timm does not know, with the close timm names, before timm is asked to build it."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or "/" in name:
        raise ConfigError(
            f"{what} {name!r} names a hub repository or folder; vpeft never downloads. Use timm's architecture "
            "name (e.g. vit_base_patch16_224.augreg_in21k) and give the weights file as model.pretrained."
        )
    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        close = close or timm.list_models(f"*{architecture[:8]}*")[:5]
        raise ConfigError(f"unknown {what} {name!r}. Close timm names: {close or 'none'}.")


def build_timm(name: str, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> TimmBackbone:
    """``timm.create_model(name)`` with random weights and no classifier; ``kwargs`` go to timm."""
    check_timm_name(name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **kwargs)
    return TimmBackbone(model)
