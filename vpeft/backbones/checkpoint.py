"""Pretrained weights from a local checkpoint file, loaded safely and strictly.

Nothing is downloaded: a checkpoint is a path to a ``.safetensors``, ``.pth``/``.pt``/``.bin`` (loaded with
``torch.load(weights_only=True)``, which refuses pickled code) or ``.npz`` (big_vision/JAX ViT, through timm's own
loader) file; a hub tag (``hf-hub:...``, ``timm/...``, a URL) is refused with a message that says how to pass a file.

Loading goes in four steps:

1. :func:`read_state_dict` unwraps the usual nesting (``state_dict``/``model``/``module``/``model_state_dict``, e.g. a
   MedSAM training checkpoint ``{"model": ..., "optimizer": ..., "epoch": ...}``) and strips the prefixes that
   wrappers add to every key (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``, ``model.``).
2. The model's library converts the layout: timm's ``checkpoint_filter_fn`` of the model's family (official CLIP,
   DINOv2, SAM layouts; resamples a ViT's position embedding), :func:`vpeft.backbones.open_clip.convert_checkpoint`
   (the ``visual.`` part of a full CLIP), :func:`vpeft.backbones.sam.convert_checkpoint` (the ``image_encoder.`` part
   of a full SAM or MedSAM).
3. :func:`resize_positions` brings grid-shaped position tables to the model's grid: SAM's absolute ``pos_embed``
   (B, H, W, C) by timm's ``resample_abs_pos_embed_nhwc`` (bicubic) and the relative position tables ``rel_pos_h/w``
   (2S - 1, C) by 1-D linear interpolation over their length, as SAM's own ``get_rel_pos`` does at run time.
4. Every tensor must find its place: missing, unexpected and mis-shaped keys are counted with examples and stop the
   load (``strict=False`` loads what fits and logs the rest). The only keys set aside are a classifier the model
   does not have (a backbone) or has for another label set (a new task's head), and parts of a full model that the
   converter names as unused (CLIP's text tower, SAM's prompt encoder and mask decoder).
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from ..errors import ConfigError, DataError, MissingFileError
from . import open_clip as open_clip_family
from . import sam as sam_family
from .base import Backbone

log = logging.getLogger("vpeft")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_NESTING = ("state_dict", "model", "module", "model_state_dict")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/", "http://", "https://")
State = dict[str, torch.Tensor]


def no_download(what: str, value: str) -> str:
    """The message for a hub tag where a local file is needed."""
    return (
        f"{what} {value!r} names weights on a hub; vpeft never downloads anything. Fetch the file once elsewhere "
        "(e.g. `huggingface-cli download timm/<name> model.safetensors`) and give its local path "
        "(.safetensors, .pth or .npz) as model.pretrained."
    )


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; a file that holds pickled code, or is not a whole torch file, raises a
    :class:`DataError` naming it. The code never runs, and the unsafe load is never suggested."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", str(err), re.DOTALL)
        what = " ".join(found.group(1).split()) if found else "not plain tensors and containers"
        raise DataError(
            f"{path} cannot be loaded safely: it holds pickled objects or code ({what}), which vpeft never runs. If "
            "the file is yours, save its tensors again as .safetensors (safetensors.torch.save_file) with a trusted "
            "copy of the code that made it."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:  # a truncated zip archive, or not a torch file at all
        first = str(err).strip().split(". ")[0] or type(err).__name__
        raise DataError(f"{path} is not a whole torch checkpoint ({first}); was it truncated?") from None


def read_state_dict(path: str | Path) -> State:
    """The tensors of a checkpoint file, unwrapped and with the usual prefixes stripped; never unpickles code."""
    if str(path).startswith(HUB_PREFIXES):
        raise ConfigError(no_download("model.pretrained", str(path)))
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"model.pretrained: {path} does not exist. Give the path of a local checkpoint file (.safetensors, .pth, "
            ".npz); nothing is downloaded."
        )
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix == ".npz":
        raise ConfigError(f"{path}: .npz checkpoints load through timm's ViT loader; use load_pretrained(model, path).")
    else:
        state = load_weights_only(path)
    # a training checkpoint holds the weights beside other things (optimizer, epoch): descend into them
    while isinstance(state, dict) and not _is_tensors(state):
        nested = next((state[k] for k in _NESTING if isinstance(state.get(k), dict)), None)
        if nested is None:
            raise DataError(
                f"{path} holds no state dict: its top-level keys are {sorted(state)[:8]}, none of them a tensor or "
                f"one of {list(_NESTING)}."
            )
        state = nested
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix) :]: v for k, v in state.items()}, True
    return state


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load ``path`` into ``model`` (a :class:`Backbone` or a library module); see the module docstring.

    ``strict=False`` loads the tensors that fit and logs the missing and unexpected ones instead of raising: the
    model is then partly random, so ask for it explicitly.
    """
    module = model.model if isinstance(model, Backbone) else model
    if Path(path).suffix == ".npz" and not str(path).startswith(HUB_PREFIXES):
        if not hasattr(module, "load_pretrained"):
            raise ConfigError(f"{path}: .npz checkpoints need a timm VisionTransformer, got {type(module).__name__}.")
        module.load_pretrained(str(path))  # timm's big_vision loader (resamples the position embedding)
        return
    state = read_state_dict(path)
    convert = converter(module)
    if convert is not None:
        try:
            state = convert(state, module)
        except (RuntimeError, AssertionError, KeyError) as err:  # a library converter meeting another layout
            raise DataError(
                f"{path}: {type(module).__module__}'s converter cannot map this checkpoint onto "
                f"{type(module).__name__} ({type(err).__name__}: {err}). Check model.name and model.kwargs."
            ) from None
    state = resize_positions(state, module)
    own = module.state_dict()
    head = _head_names(module)
    set_aside = [k for k, v in state.items() if _is_classifier(k, v, module, own, head)]
    for k in set_aside:
        del state[k]
    mismatched = [_describe(k, v.shape, own[k].shape) for k, v in state.items() if k in own and v.shape != own[k].shape]
    mismatched.sort(key=lambda text: "grid" not in text)  # position tables first: they say which size is wrong
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        message = (
            f"{path} does not fit {type(module).__name__}: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}), {len(mismatched)} with other shapes "
            f"(e.g. {mismatched[:3]})."
        )
        if strict:
            raise DataError(f"{message} Check model.name and model.kwargs against the checkpoint.")
        log.warning("vpeft: %s Loading the %d tensors that fit (strict=False).", message, len(state))
        state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    module.load_state_dict(state, strict=False)
    log.info("vpeft: loaded %s (%d tensors; classifier set aside: %s)", path, len(state), set_aside or "none")


def converter(module: nn.Module) -> Callable[[State, nn.Module], State] | None:
    """The layout converter of the module's library: timm's family filter, open_clip's or SAM's."""
    library = type(module).__module__
    if library.startswith("timm."):
        return getattr(sys.modules[library], "checkpoint_filter_fn", None)
    if library.startswith("open_clip."):
        return open_clip_family.convert_checkpoint
    if library.startswith("segment_anything."):
        return sam_family.convert_checkpoint
    return None


def resize_positions(state: State, module: nn.Module) -> State:
    """SAM-style grid position tables of ``state`` brought to ``module``'s grid (see the module docstring)."""
    own = module.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape:
            continue
        want, leaf = own[key].shape, key.rsplit(".", 1)[-1]
        if leaf in ("rel_pos_h", "rel_pos_w") and value.dim() == 2 and value.shape[1] == want[1]:
            table = value.T.unsqueeze(0)  # (L, C) -> (1, C, L): interpolate along the relative distance
            out[key] = F.interpolate(table, size=want[0], mode="linear", align_corners=False)[0].T.contiguous()
        elif leaf == "pos_embed" and value.dim() == 4 and value.shape[-1] == want[-1]:
            out[key] = resample_abs_pos_embed_nhwc(value, list(want[1:3]))  # (1, H, W, C) -> (1, h, w, C)
    return out


def _describe(key: str, file: torch.Size, model: torch.Size) -> str:
    text = f"{key}: file {tuple(file)}, model {tuple(model)}"
    if key.rsplit(".", 1)[-1] in ("pos_embed", "positional_embedding") and _grid(file) != _grid(model):
        text += f" (checkpoint grid {_grid(file)}, model grid {_grid(model)}; not interpolated)"
    return text


def _grid(shape: torch.Size) -> str:
    if len(shape) == 4:  # (1, H, W, C)
        return f"{shape[1]}x{shape[2]}"
    return f"{shape[-2]} tokens"  # (1, N, C) or (N, C): prefix tokens and a flattened grid


def _is_tensors(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _is_classifier(key: str, value: torch.Tensor, module: nn.Module, own: State, head: list[str]) -> bool:
    """A checkpoint classifier the model has for another label set, or does not have (timm backbone, no head)."""
    if key in head:
        return value.shape != own[key].shape
    cfg = getattr(module, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return key not in own and any(key == n or key.startswith(n + ".") for n in names)


def _head_names(module: nn.Module) -> list[str]:
    classifier = module.get_classifier() if hasattr(module, "get_classifier") else None
    if classifier is None:
        return []
    prefix = next((n for n, m in module.named_modules() if m is classifier), None)
    return [f"{prefix}.{k}" for k in classifier.state_dict()] if prefix else []
