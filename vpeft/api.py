"""The public functions: they bind the method registry to the core."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from . import core
from .core import Report, add_adapter, build_config, load_adapter_tensors, read_adapter, write_adapter
from .errors import ArgumentTypeError, DataError
from .interop import export_hf_peft, import_hf_peft  # noqa: F401  Hugging Face PEFT LoRA directories
from .methods import METHODS
from .plugins import PLUGINS, build_plugins
from .registry import lookup
from .version import __version__


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(METHODS)


def list_plugins() -> list[str]:
    """Names of the registered plug-ins (:mod:`vpeft.plugins`)."""
    return sorted(PLUGINS)


def apply_method(
    model: nn.Module,
    method: str,
    *,
    adapter_name: str = "default",
    calibration: Any = None,
    plugins: list[dict[str, Any]] | None = None,
    **options: Any,
) -> Report:
    """Attach ``method`` to ``model`` in place, freeze everything else, and return the trainable-parameter report.

    Options are the fields of the method's config dataclass (its defaults are the paper's VTAB-1k setting).
    ``calibration`` is an iterable of ``(inputs, targets)`` batches for methods that decide from data (SPT...).
    A second call with another ``adapter_name`` adds a second adapter (with its own head) and activates it.
    ``plugins`` (``[{"name": "density_loss", "weight": 0.1}]``, :mod:`vpeft.plugins`) run beside the adapter: extra
    loss terms and perturbations during training; they are saved with it.
    """
    _check_model(model, "apply_method", method)
    cls = lookup(METHODS, method, "method")
    config = build_config(cls.Config, options, method)
    extras = build_plugins(plugins)  # checked before the model changes
    report = add_adapter(model, cls, method, config, adapter_name, calibration)
    return _attach_plugins(model, adapter_name, extras) if extras else report


def _attach_plugins(model: nn.Module, adapter_name: str, extras: list) -> Report:
    """Attach the checked plug-ins to the new adapter; if one refuses, the adapter goes again (no half state)."""
    try:
        for name, cls, config in extras:
            core.add_plugin(model, name, cls, config, adapter_name)
    except Exception:
        core.delete_adapter(model, adapter_name)
        raise
    return core.report(model, adapter_name)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter and head tensors only)."""
    return write_adapter(model, directory, adapter_name, __version__)


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Report:
    """Rebuild the saved method on ``model`` and load its tensors; on any mismatch the model is left unchanged."""
    _check_model(model, "load_adapter", directory)
    meta, tensors = read_adapter(directory)
    name = adapter_name or meta["adapter_name"]
    cls = lookup(METHODS, meta["method"], "method")
    config = build_config(cls.Config, meta["options"], meta["method"])
    try:
        report = add_adapter(model, cls, meta["method"], config, name, prepared=True)
    except ValueError as err:
        raise DataError(f"cannot load the adapter in {directory} (saved from {meta['model_class']}): {err}") from None
    try:
        load_adapter_tensors(model, name, tensors, str(directory))
    except Exception:
        core.delete_adapter(model, name)
        raise
    saved = [{"name": p["name"], **p["options"]} for p in meta.get("plugins", [])]
    return _attach_plugins(model, name, build_plugins(saved)) if saved else report


def _check_model(model: Any, call: str, second: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"vpeft.{call} takes the model (a torch.nn.Module) first, got {type(model).__name__} {model!r:.60}; "
            f"call vpeft.{call}(model, {second!r}, ...)."
        )


merge = core.merge
unmerge = core.unmerge
disabled = core.disabled
set_adapter = core.set_adapter
delete_adapter = core.delete_adapter
report = core.report
method_loss = core.method_loss
loss_context = core.loss_context
perturb = core.perturb
restore = core.restore
on_step = core.on_step
control = core.control
StepContext = core.StepContext
