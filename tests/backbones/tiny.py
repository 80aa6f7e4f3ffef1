"""Tiny random-weight backbones of every family (depth 2, width 64) and their library's own layer outputs.

``TINY`` maps a registry name to ``(build_backbone name, kwargs, input size)``. ``reference_features`` computes the
block outputs without vpeft's hooks, from the library's own API (timm's and open_clip's ``forward_intermediates``, or
segment_anything's blocks run one by one), as the independent value the hooks must match.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from vpeft.backbones import Backbone, build_backbone

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
SAMVIT = {**VIT, "img_size": 64, "global_attn_indexes": [1], "window_size": 4, "neck_chans": 32}
SAM = {**VIT, "img_size": 64, "global_attn_indexes": (1,), "window_size": 4, "out_chans": 32}
CLIP = {"img_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}

TINY: dict[str, tuple[str, dict, int]] = {
    "timm_vit": ("vit_tiny_patch16_224", VIT, 32),
    "timm_samvit": ("samvit_base_patch16", SAMVIT, 64),
    "sam": ("sam:vit_b", SAM, 64),
    "open_clip": ("open_clip:ViT-B-16", CLIP, 32),
}
TOKEN_FAMILIES = ("timm_vit", "open_clip")  # (B, N, C) blocks; SAM blocks work on (B, h, w, C) grids


def tiny(name: str, seed: int = 0, **overrides) -> Backbone:
    model_name, kwargs, _ = TINY[name]
    if name in ("sam", "open_clip"):
        pytest.importorskip("segment_anything" if name == "sam" else "open_clip")
    torch.manual_seed(seed)
    backbone = build_backbone(model_name, **{**kwargs, **overrides})
    with torch.no_grad():  # SAM starts its relative position tables at zero: make them count in the tests
        for n, p in backbone.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.5)
    return backbone.eval()


def images(name: str, batch: int = 2, size: int | None = None) -> Tensor:
    size = size or TINY[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def reference_features(name: str, backbone: Backbone, x: Tensor, indices: list[int]) -> list[Tensor]:
    m = backbone.model
    if name in ("timm_vit", "timm_samvit"):
        return m.forward_intermediates(x, indices=indices, norm=False, output_fmt="NCHW", intermediates_only=True)
    if name == "open_clip":
        return m.forward_intermediates(x, indices=indices, intermediates_only=True)["image_intermediates"]
    y, out = m.patch_embed(x) + m.pos_embed, {}  # segment_anything: (B, h, w, C) through the blocks
    for i, block in enumerate(m.blocks):
        y = block(y)
        out[i] = y.permute(0, 3, 1, 2)
    return [out[i % len(m.blocks)] for i in indices]
