"""Pretrained weights from a local checkpoint file, loaded safely and strictly.

Nothing is downloaded: a checkpoint is a path to a ``.safetensors``, ``.pth``/``.pt``/``.bin`` (loaded with
``torch.load(weights_only=True)``, which refuses pickled code) or ``.npz`` (big_vision/JAX ViT) checkpoint. The usual
wrappers are stripped (``state_dict``/``model``/``module`` nesting, ``module.``/``_orig_mod.``/``model.`` prefixes),
the absolute position embedding is resampled when the grid differs (timm's own filter), and the load is strict: a
missing or unexpected key stops the run, except the classifier, which a new task replaces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger("vpeft")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with the usual prefixes stripped; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained: {path} does not exist. Give the path of a local checkpoint file (.safetensors, .pth, "
            ".npz); nothing is downloaded."
        )
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix == ".npz":
        raise ValueError(f"{path}: .npz checkpoints load through timm's ViT loader; use load_pretrained(model, path).")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for files that hold code
            raise ValueError(
                f"{path} cannot be loaded safely (torch.load weights_only=True refused it: {err}). "
                "Convert it to .safetensors with a trusted copy of its code."
            ) from None
    while isinstance(state, dict) and len(state) <= 3 and any(k in state for k in ("state_dict", "model", "module")):
        state = next(state[k] for k in ("state_dict", "model", "module") if k in state)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model``; only the classifier may be missing or differ (it is the new task's head)."""
    path = Path(path)
    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise ValueError(f"{path}: .npz checkpoints need a timm VisionTransformer, got {type(model).__name__}.")
        model.load_pretrained(str(path))
        return
    state = read_state_dict(path)
    filter_fn = getattr(getattr(timm.models, model.__module__.rsplit(".", 1)[-1], None), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # resamples pos_embed to the model's grid, converts official layouts
        state = filter_fn(state, model)
    own = model.state_dict()
    head = _head_names(model)
    dropped = [k for k in head if k in state and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]  # a classifier for another label set
    mismatched = [
        f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}), {len(mismatched)} with other shapes "
            f"(e.g. {mismatched[:3]}). Check model.name and model.kwargs against the checkpoint."
        )
    model.load_state_dict(state, strict=False)
    log.info("vpeft: loaded %s (%d tensors; new classifier: %s)", path, len(state), bool(dropped) or "no")


def _head_names(model: nn.Module) -> list[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        return []
    prefix = next((n for n, m in model.named_modules() if m is classifier), None)
    return [f"{prefix}.{k}" for k in classifier.state_dict()] if prefix else []
