"""UNETR's decoder over ViT block features, in 2D or 3D (also anisotropic, for volumes encoded slice by slice).

UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022, arXiv:2103.10504)
takes the outputs z_3, z_6, z_9, z_12 of a patch-16 ViT: each earlier map is brought up by transposed convolutions
to a finer scale (2x, 4x, 8x), the last one is decoded by 2x up-blocks that concatenate those skips in turn, and a
convolutional stem on the input image gives the full-resolution skip. Here the blocks are MONAI's (``UnetrBasicBlock``,
``UnetrPrUpBlock``, ``UnetrUpBlock``, ``UnetOutBlock``) and the number of stages follows the patch size p = 2^n: n
feature maps (``indices``, default spread evenly, ending at the last block) and n up-steps; p = 16 is the paper's.

``up`` is the factor of one up-step per spatial axis: 2 everywhere for a 2D image or a 3D ViT, and ``(2, 2, 1)`` when
a 2D encoder ran over the slices of a volume along its last axis (the slice axis keeps full resolution; MA-SAM and
3DSAM-adapter treat volumes this way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError

_blocks = require("monai.networks.blocks", "medical", "the UNETR head")
UnetOutBlock, UnetrBasicBlock = _blocks.UnetOutBlock, _blocks.UnetrBasicBlock
UnetrPrUpBlock, UnetrUpBlock = _blocks.UnetrPrUpBlock, _blocks.UnetrUpBlock


class UnetrDecoder(nn.Module):
    """``n`` ViT maps (B, C, *grid) and the input (B, C_in, *size) -> logits (B, num_classes, *size)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        embed_dim: int,
        patch_size: int,
        num_classes: int,
        feature_size: int = 16,
        up: int | Sequence[int] = 2,
        norm: str = "instance",
    ):
        super().__init__()
        self.stages = n = self.stages_for(patch_size)
        f = feature_size
        self.stem = UnetrBasicBlock(spatial_dims, in_channels, f, 3, 1, norm, res_block=True)
        # skip j (1..n-1) from the j-th map: up (n - j) times to the scale of stage j, width f * 2^j
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                spatial_dims, embed_dim, f * 2**j, n - j - 1, 3, 1, up, norm, conv_block=True, res_block=True
            )
            for j in range(1, n)
        )
        # decoder step j (n-1..0): from width f * 2^(j+1) (the last map: embed_dim) to f * 2^j, with skip j
        widths = [f * 2**j for j in range(n + 1)]
        self.ups = nn.ModuleList(
            UnetrUpBlock(spatial_dims, embed_dim if j == n - 1 else widths[j + 1], widths[j], 3, up, norm, True)
            for j in reversed(range(n))
        )
        self.out = UnetOutBlock(spatial_dims, f, num_classes)

    @staticmethod
    def stages_for(patch_size: int) -> int:
        """Up-steps (and feature maps) for a patch size: log2(p)."""
        stages = math.log2(patch_size)
        if stages != int(stages) or stages < 1:
            raise ConfigError(f"the UNETR decoder needs a power-of-two patch size, got {patch_size}.")
        return int(stages)

    def forward(self, features: Sequence[Tensor], image: Tensor) -> Tensor:
        if len(features) != self.stages:
            raise ValueError(
                f"the UNETR decoder takes {self.stages} feature maps (one per up-step), got {len(features)}."
            )
        skips = [self.stem(image)] + [block(x) for block, x in zip(self.skips, features[:-1], strict=True)]
        x = features[-1]
        for block, skip in zip(self.ups, reversed(skips), strict=True):
            x = block(x, skip)
        return self.out(x)
