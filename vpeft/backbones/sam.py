"""SAM's image encoder from the ``segment_anything`` package: ``sam:vit_b``, ``sam:vit_l``, ``sam:vit_h``.

SAM (Kirillov et al., "Segment Anything", ICCV 2023, arXiv:2304.02643) encodes a 1024 x 1024 image with a ViT whose
blocks attend in 14 x 14 windows except four global blocks, with decomposed relative positions (``rel_pos_h/w``)
and an absolute ``pos_embed`` (1, 64, 64, C); a neck maps the last block to a (B, 256, 64, 64) embedding.
:func:`build_sam` builds ``segment_anything.modeling.ImageEncoderViT`` with the per-size numbers of the package's
``build_sam.py`` (``_build_sam`` hard-codes 1024, so the encoder is built here to allow other sizes); the same
encoder is also in timm as ``samvit_base_patch16`` etc.

``forward`` runs the neck: (B, out_chans, h, w); ``features`` are the blocks' (B, C, h, w) outputs. The encoder has a
fixed grid: build it at the input size you train at (``img_size=512``) and an official 1024 checkpoint is resized
when it loads (absolute position embedding bicubic, the global blocks' relative position tables linearly, as SAM's
``get_rel_pos`` does). Original SAM and MedSAM files are full-SAM state dicts: the ``image_encoder.`` part is taken.
SAM normalises pixels with its ``pixel_mean``/``pixel_std`` (the ImageNet statistics) and resizes the longest side
to 1024, then pads; the data config carries the mean, std and size.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..deps import require
from ..errors import ConfigError
from ..registry import lookup
from .base import Backbone

log = logging.getLogger("vpeft")

# encoder hyper-parameters per size, as segment_anything/build_sam.py passes them to _build_sam
SAM_SIZES: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def _segment_anything():
    return require("segment_anything", "sam", "sam backbones")


class SamBackbone(Backbone):
    """``segment_anything``'s ``ImageEncoderViT``; gradient checkpointing runs its blocks one checkpoint each."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        proj = model.patch_embed.proj
        self.embed_dim = int(proj.out_channels)
        self.patch_size = int(proj.kernel_size[0])
        self.num_prefix_tokens = 0
        self.input_size = (int(model.img_size), int(model.img_size))
        self.grad_checkpointing = False
        defaults = inspect.signature(_segment_anything().modeling.Sam.__init__).parameters
        self.data_config = {
            "input_size": (3, *self.input_size),
            "mean": tuple(v / 255 for v in defaults["pixel_mean"].default),  # SAM works on 0..255 pixels
            "std": tuple(v / 255 for v in defaults["pixel_std"].default),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }

    @property
    def out_dim(self) -> int:
        return int(self.model.neck[0].out_channels)

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def run(self, x: Tensor) -> Tensor:
        m = self.model
        if not self.grad_checkpointing:
            return m(x)
        x = m.patch_embed(x)  # (B, h, w, C)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        for block in m.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return m.neck(x.permute(0, 3, 1, 2))  # (B, C, h, w) -> (B, out_chans, h, w)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def build_sam(name: str, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> SamBackbone:
    """SAM's image encoder of size ``name`` (``vit_b``/``vit_l``/``vit_h``) with random weights.

    ``img_size`` (default 1024) must be a multiple of the patch size; ``kwargs`` override any ``ImageEncoderViT``
    argument (``depth``, ``embed_dim``, ``window_size``...).
    """
    encoder = _segment_anything().modeling.ImageEncoderViT
    size = lookup(SAM_SIZES, name, "SAM image encoder size")
    if drop_path:
        raise ConfigError("segment_anything's image encoder has no stochastic depth; leave model.drop_path at 0.")
    options: dict[str, Any] = {
        "img_size": 1024,
        "patch_size": 16,
        "mlp_ratio": 4,
        "norm_layer": partial(nn.LayerNorm, eps=1e-6),
        "qkv_bias": True,
        "use_rel_pos": True,
        "window_size": 14,
        "out_chans": 256,
        **size,
        **kwargs,
    }
    if img_size is not None:
        options["img_size"] = img_size
    known = set(inspect.signature(encoder.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"SAM image encoder options {unknown} do not exist; valid ones: {sorted(known)}.")
    size, patch = options["img_size"], options["patch_size"]
    if size % patch:
        fit = max(patch, size // patch * patch)
        raise ConfigError(f"SAM img_size {size} is not a multiple of the patch size {patch}; use e.g. {fit}.")
    return SamBackbone(encoder(**options))


def convert_checkpoint(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A full SAM/MedSAM state dict -> its ``image_encoder.`` part (prompt encoder and mask decoder set aside)."""
    if any(k.startswith("image_encoder.") for k in state):
        rest = sum(not k.startswith("image_encoder.") for k in state)
        state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
        log.info("vpeft: a full SAM checkpoint; took the image encoder, set aside %d prompt/decoder tensors", rest)
    return state
