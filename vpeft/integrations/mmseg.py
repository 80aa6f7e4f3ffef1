"""vpeft backbones in OpenMMLab configs: ``type='vpeft.Backbone'``, built through mmengine's model registry.

Rein, SoMA and Earth-Adapter are built on mmsegmentation. Importing this module registers :class:`MMSegBackbone` as
``Backbone`` in a registry of scope ``vpeft`` under mmengine's root ``MODELS``, the registry every OpenMMLab model
registry (mmseg's included) falls back to for a scoped name. With the pinned extra (``pip install 'vpeft[mmseg]'``:
mmsegmentation, mmengine and mmcv-lite, which has no compiled ops) this is the call that works::

    import vpeft.integrations.mmseg  # noqa: F401  (registers vpeft.Backbone)
    from mmengine.registry import MODELS

    backbone = MODELS.build(dict(
        type="vpeft.Backbone",
        name="vit_base_patch16_224",            # a vpeft backbone name (timm, or "family:name")
        pretrained="checkpoints/vit_b16.safetensors",
        method="lora", method_options=dict(r=8),
        out_indices=(3, 5, 7, 11),
        img_size=512,                            # other keys go to the backbone builder
    ))
    features = backbone(images)                  # a tuple of (B, C, h, w) maps, one per out_indices

Whole mmseg models (``EncoderDecoder`` with ``UPerHead``...) need mmcv's compiled ops: the first build from
``mmseg.registry.MODELS`` (or under ``init_default_scope('mmseg')``, as mmseg's tools do) imports ``mmseg.models``,
which imports ``mmcv.ops`` and stops with ``No module named 'mmcv._ext'`` under mmcv-lite, before any vpeft code runs.
With a full mmcv build the same ``backbone=dict(type='vpeft.Backbone', ...)`` goes into an mmseg config as is
(``custom_imports = dict(imports=["vpeft.integrations.mmseg"], allow_failed_imports=False)``): mmseg's registry finds
the ``vpeft`` scope through the root. vpeft's own segmentation task (``task: segmentation``, UPerNet and linear
heads) needs neither.

The module returns a tuple of (B, C, h, w) maps, one per ``out_indices``, as mmseg backbones do. The method freezes
the backbone except its own tensors; the neck and heads train as usual. Save the adapter alone with
``vpeft.save_adapter(backbone.backbone, path)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

import vpeft

from ..backbones import build_backbone
from ..backbones.checkpoint import load_pretrained
from ..deps import require

require("mmseg.registry", "mmseg", "vpeft.integrations.mmseg")  # the configs this serves are mmseg's
BaseModule = require("mmengine.model", "mmseg", "vpeft.integrations.mmseg").BaseModule
Registry = require("mmengine.registry", "mmseg", "vpeft.integrations.mmseg").Registry
MODELS = require("mmengine.registry", "mmseg", "vpeft.integrations.mmseg").MODELS  # the root every registry reaches

NAME = "vpeft.Backbone"


class MMSegBackbone(BaseModule):
    """A vpeft backbone with a PEFT method applied, as an mmseg backbone: ``forward(x) -> tuple`` of NCHW maps.

    Args:
        name: vpeft backbone name (``build_backbone``).
        pretrained: Local checkpoint file loaded before the method is applied (None: random weights).
        method: vpeft method name (``vpeft.METHODS``); ``method_options`` its options.
        out_indices: Blocks whose outputs are returned.
        **kwargs: For the backbone builder (``img_size``, ``drop_path``, timm keyword arguments).
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        method: str = "lora",
        method_options: dict[str, Any] | None = None,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        init_cfg: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(init_cfg)
        self.backbone = build_backbone(name, **kwargs)
        if pretrained:
            load_pretrained(self.backbone.model, pretrained)
        self.out_indices = list(out_indices)
        self.backbone._resolve(self.out_indices)  # fail now, not at the first forward pass
        self.report = vpeft.apply_method(self.backbone, method, **(method_options or {}))

    def init_weights(self) -> None:
        """Keep the loaded weights: mmengine's init would overwrite the pretrained backbone."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone.features(x, self.out_indices))


# mmengine reads a dotted type as `scope.name`: "vpeft.Backbone" is "Backbone" in the registry of scope "vpeft". It
# hangs under the root, not under mmseg's MODELS: a lookup in mmseg's registry first imports mmseg.models (mmcv's
# compiled ops), the root's does not, and every OpenMMLab registry reaches the root's children by scope.
VPEFT_MODELS = MODELS.children.get("vpeft") or Registry("model", parent=MODELS, scope="vpeft")
VPEFT_MODELS.register_module(name=NAME.split(".")[1], module=MMSegBackbone, force=True)

__all__ = ["NAME", "VPEFT_MODELS", "MMSegBackbone"]
