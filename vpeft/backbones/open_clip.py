"""open_clip models: ``open_clip:ViT-B-16`` is the ``visual`` part of open_clip's model of that name, and
:func:`build_clip_model` the whole model (both towers) for tasks that classify with text (``tasks/clip.py``).

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
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError, DataError, MissingFileError
from .base import Backbone

log = logging.getLogger("vpeft")


def _open_clip():
    return require("open_clip", "clip", "open_clip backbones")


def clip_normalisation(size: tuple[int, int]) -> dict[str, Any]:
    """The data config of open_clip's CLIP preprocessing at ``size`` (OpenAI's mean and std, bicubic, no crop)."""
    open_clip = _open_clip()
    return {
        "input_size": (3, *size),
        "mean": tuple(open_clip.OPENAI_DATASET_MEAN),
        "std": tuple(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "crop_pct": 1.0,  # open_clip: resize the short side to the input size, then centre crop
    }


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
        self.data_config = clip_normalisation(self.input_size)

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
    """A full CLIP state dict -> its ``visual.`` part; ``proj`` dropped when the tower has none; positions resized.

    For a whole model (``CustomTextCLIP``, from :func:`build_clip_model`) the state keeps both towers: OpenAI's layout
    (text tensors at the top level) is moved under ``text.`` by open_clip's converter, and the image tower's part is
    converted as for a tower alone."""
    open_clip = _open_clip()
    if isinstance(model, open_clip.CustomTextCLIP):
        state = open_clip.model.convert_to_custom_text_state_dict(dict(state))
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        rest = {k: v for k, v in state.items() if not k.startswith("visual.")}
        return {**rest, **{f"visual.{k}": v for k, v in convert_checkpoint(visual, model.visual).items()}}
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


def clip_model_config(name: str) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) of a registered model name, or of a
    local JSON file (``configs/clip/scenes_tiny.json``) that holds one in the same format."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise MissingFileError(f"model.name: the open_clip model config {path} does not exist.")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); it should hold an open_clip model config.") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise ConfigError(f"{path}: an open_clip model config needs {missing} (see open_clip's model_configs).")
        return config
    config = _open_clip().get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, _open_clip().list_models(), n=5, cutoff=0.5)
        raise ConfigError(
            f"unknown open_clip model {name!r}. Close open_clip names: {close or 'none'}; or give the path of a JSON "
            "file holding an open_clip model config."
        )
    return config


def clip_data_config(name: str) -> dict[str, Any]:
    """The image preprocessing of open_clip model ``name``: its image size with CLIP's normalisation."""
    size = clip_model_config(name)["vision_cfg"].get("image_size", 224)
    return clip_normalisation((size, size) if isinstance(size, int) else tuple(size))


def build_clip_model(name: str) -> nn.Module:
    """open_clip's whole model of ``name`` (see :func:`clip_model_config`) as a ``CustomTextCLIP`` (towers ``visual``
    and ``text``, and ``logit_scale``) with random weights; ``load_pretrained`` loads a checkpoint in OpenAI's layout
    or open_clip's into it (through :func:`convert_checkpoint`)."""
    open_clip = _open_clip()
    config = clip_model_config(name)
    if config["vision_cfg"].get("timm_model_name") or config["text_cfg"].get("hf_model_name"):
        raise ConfigError(f"open_clip model {name!r} takes a tower from timm or Hugging Face; use a plain CLIP config.")
    options = {k: v for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    return open_clip.CustomTextCLIP(**options, init_logit_bias=config.get("init_logit_bias"))


def clip_tokenizer(name: str) -> Callable[[list[str]], Tensor]:
    """The tokenizer of open_clip model ``name``: texts -> (N, context_length) token ids. A JSON config gets
    open_clip's CLIP tokenizer (byte-pair, shipped with open_clip) at the config's context length."""
    open_clip = _open_clip()
    text_cfg = clip_model_config(name)["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(f"open_clip model {name!r} uses a Hugging Face tokenizer, which cannot be loaded offline.")
    if name.endswith(".json"):
        return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    return open_clip.get_tokenizer(name)
