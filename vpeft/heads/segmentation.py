"""Semantic segmentation heads over ViT block features: a linear probe and UPerNet on a simple feature pyramid.

- ``linear``: BatchNorm + 1x1 conv on the patch features of one block (or several, resized to the first and
  concatenated), upsampled bilinearly to the image: the "linear" evaluation of Segmenter (Strudel et al., ICCV 2021)
  and DINOv2 (Oquab et al., 2023, Sec. 7.4; "+ms" when several blocks are given).
- ``upernet``: :class:`~vpeft.heads.pyramid.SimpleFeaturePyramid` turns the ViT maps into strides p/4..2p, then
  UPerNet (Xiao et al., "Unified Perceptual Parsing", ECCV 2018): a pyramid pooling module (PSPNet, Zhao et al.
  CVPR 2017) on the coarsest level, FPN laterals with a top-down pathway (Lin et al. CVPR 2017), every level upsampled
  to the finest and fused by a 3x3 conv, dropout, then a 1x1 classifier. With four block indices this is the
  BEiT/ViT UPerNet of mmsegmentation; with one it is the ViTDet-style pyramid of a single map.

:class:`SegmentationModel` runs ``backbone.features(x, indices)`` and the decoder and returns logits at the input's
size. ``get_classifier()`` returns the decoder (pyramid + head): the PEFT core trains it beside the adapter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from ..backbones import Backbone
from ..errors import ConfigError
from ..registry import lookup
from .pyramid import SimpleFeaturePyramid


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear")


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv over ``len(features)`` maps of ``in_channels`` each (concatenated at the first's size)."""

    def __init__(self, in_channels: int, num_levels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        width = in_channels * num_levels
        self.norm = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([_resize(f, size) for f in features], dim=1)  # (B, levels * C, h, w)
        return self.classifier(self.dropout(self.norm(x)))


def _cbr(cin: int, cout: int, kernel: int) -> nn.Module:
    """conv + BatchNorm + ReLU, the ConvModule of UPerNet."""
    return Conv2dNormActivation(cin, cout, kernel, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


class PyramidPooling(nn.Module):
    """PSPNet's PPM: average-pool to each ``bins`` x ``bins`` grid, 1x1 conv, upsample, concatenate with the input."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), _cbr(in_channels, channels, 1)) for b in bins
        )
        self.bottleneck = _cbr(in_channels + len(bins) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [_resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """UPerNet decoder over maps finest-first, all with ``in_channels``; returns logits at the finest level."""

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        channels: int,
        num_classes: int,
        pool_bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ppm = PyramidPooling(in_channels, channels, pool_bins)
        self.laterals = nn.ModuleList(_cbr(in_channels, channels, 1) for _ in range(num_levels - 1))
        self.smooth = nn.ModuleList(_cbr(channels, channels, 3) for _ in range(num_levels - 1))
        self.fuse = _cbr(num_levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        levels = [lateral(f) for lateral, f in zip(self.laterals, features[:-1], strict=True)]
        levels.append(self.ppm(features[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse to fine
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(x, size) for x in outs], dim=1))  # (B, channels, h_finest, w_finest)
        return self.classifier(self.dropout(fused))


class UPerNet(nn.Module):
    """SimpleFeaturePyramid + UPerHead: the module the PEFT core trains as the head."""

    def __init__(self, neck: SimpleFeaturePyramid, head: UPerHead):
        super().__init__()
        self.neck, self.head = neck, head

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.head(self.neck(features))


class SegmentationModel(nn.Module):
    """``backbone`` features of blocks ``indices`` -> ``decoder`` -> logits (B, num_classes, H, W) at the input size."""

    def __init__(self, backbone: Backbone, decoder: nn.Module, indices: Sequence[int], num_classes: int):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.indices, self.num_classes = list(indices), num_classes

    def get_classifier(self) -> nn.Module:
        return self.decoder

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.backbone.features(x, self.indices))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def default_indices(depth: int, count: int) -> list[int]:
    """``count`` blocks spread evenly, ending at the last: depth 12, count 4 -> [2, 5, 8, 11]."""
    return [depth * (i + 1) // count - 1 for i in range(count)]


def build_linear(
    backbone: Backbone, num_classes: int, indices: Sequence[int] | None = None, dropout: float = 0.0
) -> SegmentationModel:
    indices = list(indices) if indices is not None else [-1]
    return SegmentationModel(
        backbone, LinearHead(backbone.embed_dim, len(indices), num_classes, dropout), indices, num_classes
    )


def build_upernet(
    backbone: Backbone,
    num_classes: int,
    indices: Sequence[int] | None = None,
    channels: int = 512,
    neck_channels: int | None = None,
    scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    pool_bins: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
) -> SegmentationModel:
    """UPerNet on ``indices`` (default: four blocks spread evenly; one index: ViTDet's single-map pyramid)."""
    indices = list(indices) if indices is not None else default_indices(backbone.depth, len(scales))
    if len(indices) not in (1, len(scales)):
        raise ConfigError(
            f"model.head.indices: upernet takes 1 block or one per scale ({len(scales)} for scales {list(scales)}), "
            f"got {indices}."
        )
    neck = SimpleFeaturePyramid(backbone.embed_dim, neck_channels or backbone.embed_dim, scales)
    head = UPerHead(neck.out_channels, len(scales), channels, num_classes, pool_bins, dropout)
    return SegmentationModel(backbone, UPerNet(neck, head), indices, num_classes)


HEADS: dict[str, Callable[..., SegmentationModel]] = {"linear": build_linear, "upernet": build_upernet}


def build_segmentation_model(
    backbone: Backbone, num_classes: int, name: str = "upernet", **options: Any
) -> SegmentationModel:
    """``HEADS[name](backbone, num_classes, **options)``; options the head does not take are named in the error."""
    builder = lookup(HEADS, name, "segmentation head")
    known = [p for p in inspect.signature(builder).parameters if p not in ("backbone", "num_classes")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"model.head: the {name!r} head takes {known}; {unknown} is not one of them.")
    return builder(backbone, num_classes, **options)
