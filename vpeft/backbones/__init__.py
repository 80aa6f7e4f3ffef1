"""Backbones: ViT-family image encoders (and Hugging Face models) behind one interface (:class:`Backbone`).

``build_backbone(name)`` with ``name`` a timm name (``vit_base_patch16_224``) or ``family:name``:

==============  ==============================================  ===============================================
family          name                                            built by
==============  ==============================================  ===============================================
``timm``        any timm ViT-family name, optional ``.tag``     ``timm.create_model`` (no classifier)
``open_clip``   an open_clip model name (``ViT-B-16``)          its image tower (``visual``), no projection
``sam``         ``vit_b``, ``vit_l``, ``vit_h``                 ``segment_anything``'s ``ImageEncoderViT``
``hf``          a local folder (``config.json`` + weights)      ``transformers.AutoModel`` (offline)
==============  ==============================================  ===============================================

The model has random weights unless ``pretrained`` names a local checkpoint file, which
:func:`~vpeft.backbones.checkpoint.load_pretrained` loads strictly (``strict=False`` to allow a partial load).
``BACKBONES`` maps a family to its builder; add your own with ``BACKBONES["mine"] = builder``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..registry import lookup
from .base import POOLS, Backbone
from .checkpoint import HUB_PREFIXES, load_pretrained, no_download, read_state_dict
from .hf import HFBackbone, build_hf
from .open_clip import OpenClipBackbone, build_open_clip
from .sam import SamBackbone, build_sam
from .timm import TimmBackbone, build_timm, check_timm_name

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "timm": build_timm,
    "open_clip": build_open_clip,
    "sam": build_sam,
    "hf": build_hf,
}


def build_backbone(name: str, pretrained: str | None = None, strict: bool = True, **kwargs: Any) -> Backbone:
    """``family:model`` (``timm`` when no family is given); ``kwargs`` go to the family's builder."""
    if name.startswith(HUB_PREFIXES) or name.startswith("local-dir:"):
        raise ConfigError(no_download("model.name", name))
    family, colon, model = name.partition(":")
    if not colon:
        family, model = "timm", name
    backbone = lookup(BACKBONES, family, "backbone family")(model, **kwargs)
    if pretrained:
        load_pretrained(backbone, pretrained, strict=strict)
    return backbone


__all__ = [
    "BACKBONES",
    "POOLS",
    "Backbone",
    "HFBackbone",
    "OpenClipBackbone",
    "SamBackbone",
    "TimmBackbone",
    "build_backbone",
    "check_timm_name",
    "load_pretrained",
    "read_state_dict",
]
