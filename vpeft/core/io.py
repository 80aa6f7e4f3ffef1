"""Adapter files: ``adapter_config.json`` plus ``adapter_model.safetensors``, written atomically, never pickled.

The tensors are the adapter's own (parameters and persistent buffers of its modules), its head copy, tensors shared
across targets and any base tensors the method trains; keys are logical and carry no adapter name, so a file loads
under any name. Keys look like ``blocks.0.attn.qkv.q.lora_A`` (target, part, tensor) and ``head.weight``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DataError, MissingFileError
from ..files import atomic_write
from .config import config_to_dict
from .inject import adapted_modules, adapter_record, unmerged_adapter
from .targets import SHARED

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "vpeft.adapter"
FORMAT_VERSION = 1


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The live tensors of adapter ``name`` under their file keys."""
    out: dict[str, Tensor] = {}
    for adapted in adapted_modules(model, name):
        for part, module in adapted.parts.items():
            prefix = adapted.path if adapted.head else f"{adapted.path}.{part}"
            out.update({f"{prefix}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    container = model._modules.get(SHARED)
    if container is not None and name in container:
        out.update({f"{SHARED}.{k}": v for k, v in container[name].state_dict(keep_vars=True).items()})
    params = dict(model.named_parameters())
    out.update({n: params[n] for n in adapter_record(model, name).trainable_base})
    return out


def write_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None, version: str) -> Path:
    """Write adapter ``name`` (default: the active one) as ``adapter_config.json`` + ``adapter_model.safetensors``."""
    name, record = unmerged_adapter(model, name, "saving")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(model, name).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vpeft_version": version,
        "adapter_name": name,
        "method": record.method,
        "options": config_to_dict(record.config),
        "targets": record.targets,
        "heads": record.heads,
        "plugins": [{"name": n, "options": config_to_dict(p.config)} for n, p in record.plugins.items()],
        "model_class": type(model).__qualname__,
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
    }
    directory = Path(directory)
    # tensors first, config last: a directory with a config always has the matching tensors
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The saved config and tensors of an adapter directory, checked for format."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise MissingFileError(
            f"{config_path} does not exist: not a vpeft adapter directory (vpeft.save_adapter "
            "writes adapter_config.json and adapter_model.safetensors)."
        )
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{config_path} is not valid JSON ({err}); is it truncated?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        hint = " It looks like a Hugging Face PEFT adapter: use vpeft.import_hf_peft." if "peft_type" in meta else ""
        raise DataError(f"{config_path} is not a vpeft adapter config (format {meta.get('format')!r}).{hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(
            f"{config_path} has format_version {meta['format_version']}; this vpeft reads up to "
            f"{FORMAT_VERSION}. Upgrade vpeft."
        )
    lacking = [k for k in ("adapter_name", "method", "options", "model_class") if k not in meta]
    if lacking:
        raise DataError(f"{config_path} lacks {lacking}: it was edited or is damaged; save the adapter again.")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(f"{weights} does not exist: the adapter directory {directory} is incomplete.")
    try:
        return meta, load_file(str(weights))
    except SafetensorError as err:
        raise DataError(f"{weights} cannot be read ({err}); is it truncated? Save the adapter again.") from None


def load_adapter_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor], source: str) -> None:
    """Copy ``tensors`` into adapter ``name``; every key and shape must match, or nothing is copied."""
    live = adapter_tensors(model, name)
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    mismatched = [
        (k, tuple(tensors[k].shape), tuple(live[k].shape))
        for k in live
        if k in tensors and tensors[k].shape != live[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"the adapter in {source} does not fit this model ({type(model).__qualname__}):"]
        if mismatched:
            lines.append(
                f"  {len(mismatched)} shape mismatches, e.g. "
                + "; ".join(f"{k}: saved {a}, model {b}" for k, a, b in mismatched[:5])
            )
        if missing:
            lines.append(f"  {len(missing)} tensors the model expects are not in the file, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} tensors in the file have no place in the model, e.g. {unexpected[:5]}")
        raise DataError("\n".join(lines))
    with torch.no_grad():
        for k, v in live.items():
            v.copy_(tensors[k].to(v.dtype))
