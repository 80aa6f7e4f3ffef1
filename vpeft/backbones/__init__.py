"""Backbones: ViT-family image encoders behind one interface (:class:`Backbone`).

``build_backbone("vit_base_patch16_224")`` takes any timm name; a ``family:`` prefix picks another library
(``BACKBONES`` maps the family to its builder; add your own with ``BACKBONES["mine"] = builder``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import lookup
from .base import POOLS, Backbone
from .timm import TimmBackbone, build_timm

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "timm": build_timm,
}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """``family:model`` (``timm`` when no family is given) with random weights; see each builder for options."""
    family, _, model = name.rpartition(":")
    return lookup(BACKBONES, family or "timm", "backbone family")(model, **kwargs)


__all__ = ["BACKBONES", "POOLS", "Backbone", "TimmBackbone", "build_backbone"]
