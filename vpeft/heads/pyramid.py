"""Multi-scale feature maps from a plain ViT: the simple feature pyramid of ViTDet.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet, ECCV 2022), Sec. 3: from the
last (B, C, h, w) map of a ViT with patch size p (stride p), build maps at strides p/4, p/2, p and 2p with

- 4x: two 2x2 stride-2 transposed convolutions (LayerNorm and GELU between them),
- 2x: one 2x2 stride-2 transposed convolution,
- 1x: identity,
- 0.5x: 2x2 max-pooling with stride 2,

each followed by a 1x1 conv + norm and a 3x3 conv + norm to ``out_channels``. The channels halve at each transposed
convolution (C -> C/2 -> C/4), as in ViTDet.

With as many inputs as scales (e.g. blocks 3, 5, 7, 11 of ViT-B), level ``i`` is rescaled by ``scales[i]`` instead:
the multi-level neck that ViT/BEiT UPerNet segmentation uses (mmseg's ``MultiLevelNeck``, BEiT's ``fpn1..fpn4``).
Any power-of-two scale works (2^k: k transposed convs up, or -k poolings down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..errors import ConfigError


def _rescale(channels: int, scale: float) -> tuple[nn.Module, int]:
    """The op that resizes a (B, channels, h, w) map by ``scale`` and its output channel count."""
    steps = math.log2(scale) if scale > 0 else float("nan")
    if not float(steps).is_integer():
        raise ConfigError(f"SimpleFeaturePyramid scales must be powers of two (4, 2, 1, 0.5, ...), got {scale}.")
    steps = int(steps)
    if steps <= 0:  # identity (0) or |steps| 2x2 max-poolings
        return nn.Sequential(*[nn.MaxPool2d(2, 2) for _ in range(-steps)]), channels
    layers: list[nn.Module] = []
    for i in range(steps):
        out = max(channels // 2, 1)
        layers.append(nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2))
        if i + 1 < steps:  # between transposed convs only, as ViTDet's 4x branch
            layers += [LayerNorm2d(out), nn.GELU()]
        channels = out
    return nn.Sequential(*layers), channels


class SimpleFeaturePyramid(nn.Module):
    """One ViT map -> one map per scale; or ``len(scales)`` maps -> each rescaled by its own scale.

    Args:
        in_channels: Channels of the backbone maps (the ViT width).
        out_channels: Channels of every output map.
        scales: Resize factors relative to the ViT grid, finest first (strides ``patch_size / scale``).
    """

    def __init__(self, in_channels: int, out_channels: int, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        if not scales:
            raise ConfigError("SimpleFeaturePyramid needs at least one scale.")
        self.in_channels, self.out_channels, self.scales = in_channels, out_channels, tuple(float(s) for s in scales)
        self.rescale = nn.ModuleList()
        self.output = nn.ModuleList()
        for scale in self.scales:
            op, channels = _rescale(in_channels, scale)
            self.rescale.append(op)
            self.output.append(
                nn.Sequential(
                    nn.Conv2d(channels, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def strides(self, patch_size: int) -> list[int]:
        """Feature strides in pixels of the outputs, for a backbone with ``patch_size``."""
        strides = [patch_size / s for s in self.scales]
        if not all(s.is_integer() for s in strides):
            raise ConfigError(f"patch size {patch_size} over scales {self.scales} gives fractional strides {strides}.")
        return [int(s) for s in strides]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) == 1:
            features = list(features) * len(self.scales)
        elif len(features) != len(self.scales):
            raise ConfigError(
                f"SimpleFeaturePyramid with {len(self.scales)} scales takes 1 or {len(self.scales)} feature maps, "
                f"got {len(features)}."
            )
        return [out(op(x)) for x, op, out in zip(features, self.rescale, self.output, strict=True)]
