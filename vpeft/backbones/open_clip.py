"""open_clip image towers: ``open_clip:ViT-B-16`` is the ``visual`` part of open_clip's model of that name.

Only the image tower is built (open_clip's own ``_build_vision_tower`` from the model's config; no text tower), with
random weights. OpenAI's CLIP weights were trained with QuickGELU: name open_clip's ``-quickgelu`` variant
(``open_clip:ViT-B-16-quickgelu``) for them, the plain name for LAION/DataComp weights.

``forward`` returns the tokens after ``ln_post`` (B, 1 + h * w, C): the class token first, then the patch tokens,
as open_clip normalises them before pooling. ``pool(tokens, "token")`` is therefore open_clip's pooled image feature
*before* the image-text projection ``proj``, which is dropped (a classifier learns its own): the tower's width is
``embed_dim``. The attention is ``nn.MultiheadAttention`` (``transformer.resblocks.N.attn``); the core slices its
in-projection, so the roles ``q``/``k``/``v`` target ``attn[q]`` etc. Position embeddings of a checkpoint trained at
another size are resized with open_clip's ``resize_pos_embed`` (bicubic) when it loads.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Sequence
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError, DataError
from .base import Backbone

log = logging.getLogger("vpeft")


def _open_clip():
    return require("open_clip", "clip", "open_clip backbones")


class OpenClipBackbone(Backbone):
    """An open_clip ``VisionTransformer`` (class token, learnable position embedding, ``ln_post``)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        open_clip = _open_clip()
        if not isinstance(model, open_clip.transformer.VisionTransformer):
            raise ConfigError(
                f"open_clip tower {type(model).__name__} is not open_clip's VisionTransformer; for towers that "
                "open_clip takes from timm, use the timm name as the backbone."
            )
        if model.attn_pool is not None:
            raise ConfigError("open_clip towers with attentional pooling (CoCa) are not supported as backbones.")
        model.proj = None  # the image-text projection: not part of the token features (open_clip allows None)
        self.embed_dim = int(model.transformer.width)
        self.patch_size = int(model.patch_size[0])
        self.num_prefix_tokens = 1
        self.input_size = (int(model.image_size[0]), int(model.image_size[1]))
        self.data_config = {
            "input_size": (3, *self.input_size),
            "mean": tuple(open_clip.OPENAI_DATASET_MEAN),
            "std": tuple(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "crop_pct": 1.0,  # open_clip: resize the short side to the input size, then centre crop
        }

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.transformer.resblocks

    def run(self, x: Tensor) -> Tensor:
        out = self.model.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC",
            output_extra_tokens=True,
        )  # fmt: skip
        # the last block through ln_post, split by open_clip into the class token (B, 1, C) and patches (B, h*w, C)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def build_open_clip(name: str, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> OpenClipBackbone:
    """The image tower of open_clip model ``name`` with random weights; ``kwargs`` override its ``vision_cfg``."""
    open_clip = _open_clip()
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise ConfigError(f"unknown open_clip model {name!r}. Close open_clip names: {close or 'none'}.")
    if drop_path:
        raise ConfigError("open_clip image towers have no stochastic depth; leave model.drop_path at 0.")
    vision = {**config["vision_cfg"], **kwargs, **({"image_size": img_size} if img_size is not None else {})}
    if vision.get("timm_model_name"):
        raise ConfigError(f"open_clip model {name!r} takes its image tower from timm ({vision['timm_model_name']}).")
    known = {f.name for f in fields(open_clip.CLIPVisionCfg)}
    unknown = sorted(set(vision) - known)
    if unknown:
        raise ConfigError(f"open_clip vision options {unknown} do not exist; valid ones: {sorted(known)}.")
    model = open_clip.model._build_vision_tower(config["embed_dim"], vision, quick_gelu=config.get("quick_gelu", False))
    return OpenClipBackbone(model)


def convert_checkpoint(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A full CLIP state dict -> its ``visual.`` part; ``proj`` dropped when the tower has none; positions resized."""
    if any(k.startswith("visual.") for k in state):
        rest = sum(not k.startswith("visual.") for k in state)
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        log.info("vpeft: a full CLIP checkpoint; took the image tower, set aside %d text-tower tensors", rest)
    if getattr(model, "proj", None) is None and "proj" in state:
        state = {k: v for k, v in state.items() if k != "proj"}
    table = state.get("positional_embedding")
    if table is not None and hasattr(model, "grid_size") and table.shape != model.positional_embedding.shape:
        side = math.isqrt(table.shape[0] - 1)  # open_clip's resize assumes one class token and a square grid
        if side * side != table.shape[0] - 1 or table.shape[1] != model.positional_embedding.shape[1]:
            raise DataError(
                f"the checkpoint's positional_embedding {tuple(table.shape)} is not a class token plus a square grid "
                f"of width {model.positional_embedding.shape[1]}, so it cannot be interpolated to the model's grid "
                f"{model.grid_size[0]}x{model.grid_size[1]}; build the model at the checkpoint's size."
            )
        resized = {"visual.positional_embedding": state["positional_embedding"]}
        _open_clip().model.resize_pos_embed(resized, SimpleNamespace(visual=model))  # in place, open_clip's helper
        state = {**state, "positional_embedding": resized["visual.positional_embedding"]}
    return state
