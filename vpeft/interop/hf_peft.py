"""Hugging Face PEFT LoRA directories: export a vpeft LoRA adapter to them, and import them as vpeft adapters.

A Hugging Face PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``) and
``adapter_model.safetensors``. The mapping between the two formats:

===============================================  ============================================================
vpeft                                            Hugging Face PEFT
===============================================  ============================================================
target ``path`` (whole Linear / HF Conv1D)       ``base_model.model.<path>.lora_A.weight`` (r, in) and
  ``lora_A`` (r, in), ``lora_B`` (out, r)          ``...lora_B.weight`` (out, r); ``<path>`` in target_modules
target ``path`` (Conv2d, dilation 1, groups 1)   ``lora_A.weight`` (r, in, kh, kw), ``lora_B.weight`` (out, r, 1, 1)
``scale = alpha / r``                            ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora)
slices ``path[q]``, ``path[v]`` of a fused       one rank-(r_q + r_v) LoRA on the whole ``path``:
  ``qkv`` (``d`` rows each), rank r each           ``lora_A = [A_q; A_v]`` (2r, in) and ``lora_B`` (3d, 2r) holding
                                                   ``B_q`` in the q rows / first r columns, ``B_v`` in the v rows /
                                                   last r columns, zeros elsewhere; ``lora_alpha = scale * 2r``
DoRA magnitude (out,) of a target                ``base_model.model.<path>.lora_magnitude_vector`` (out,)
                                                   (``use_dora: true``; rows of untouched slices hold the row norms
                                                   of the base weight, which makes them an identity)
head copy of ``head`` (its own state dict)       ``base_model.model.<head>.<tensor>``; ``head`` in modules_to_save
LoRA dropout                                     ``lora_dropout``
===============================================  ============================================================

``target_modules`` lists the exact logical module paths (a full-match regex when a path is also the suffix of another
module's path); modules whose rank or scale differs from the most common one go to ``rank_pattern`` /
``alpha_pattern``. The zero blocks make the fused export exact: the k rows get ``+ 0`` and each slice gets its own
update, so ``PeftModel.from_pretrained(base, directory)`` computes what the vpeft model computes. A DyLoRA adapter
exports as the LoRA it is at its evaluation rank. Export also writes ``vpeft_export.json``: the vpeft method, options,
target keys, heads and, per exported module, which rows and rank columns each vpeft part occupies, plus the SHA-256 of
the weights file. When it is present and the weights file still matches, :func:`import_hf_peft` rebuilds the original
(sliced) vpeft adapter with the very same tensors. Without it (a directory written by Hugging Face PEFT itself, or
retrained and saved again), import builds a whole-module LoRA on every module that has ``lora_A``/``lora_B`` tensors,
with the saved scale, and the saved ``modules_to_save`` tensors become the head copy. Pickled ``adapter_model.bin``
files are refused, never loaded.

Not expressible, and refused with an error that says so: methods outside the LoRA family (IA3 and VeRA export through
``hf_peft_vectors``), LoRA on ``nn.MultiheadAttention`` (Hugging Face PEFT adapts its in- and out-projections
together, with its own tensor layout), Conv2d with dilation or groups, and on import LoRA variants vpeft lacks
(``lora_bias``, embeddings, ``target_parameters``, trainable tokens, per-module ranks or scales).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ..core import (
    CONFIG_FILE,
    ROLES,
    WEIGHTS_FILE,
    WHOLE,
    AdaptedModule,
    Report,
    adapted_modules,
    adapter_names,
    adapter_record,
    add_adapter,
    build_config,
    config_to_dict,
    delete_adapter,
    is_conv1d,
    load_adapter_tensors,
    report,
    unmerged_adapter,
    walk,
    weight_and_bias,
)
from ..errors import ConfigError, DataError, MissingFileError
from ..files import atomic_write
from ..methods import METHODS
from ..registry import lookup
from ..version import __version__

log = logging.getLogger("vpeft")

SIDECAR_FILE = "vpeft_export.json"
SIDECAR_FORMAT = "vpeft.hf_peft_export"
SIDECAR_VERSION = 1
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model
# what each LoRA variant (AdapterModule.lora_variant) is in a Hugging Face PEFT LoRA config
PEFT_FLAGS = {"lora": {"use_dora": False}, "dora": {"use_dora": True}}
PART_ORDER = (WHOLE, "q", "k", "v")
_MAGNITUDE_KEY = "magnitude"  # the DoRA magnitude parameter of vpeft's dora method


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------


def export_hf_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a Hugging Face PEFT LoRA directory.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces the vpeft model's outputs. Only the
    LoRA family exports (``lora``, and ``dora`` as ``use_dora``); slices of fused projections become exact
    block-structured whole-module LoRAs (see the module docstring).
    """
    name, record = unmerged_adapter(model, adapter_name, "exporting")
    flags = PEFT_FLAGS.get(record.method_cls.lora_variant)
    if flags is None:
        raise ConfigError(
            f"cannot export adapter {name!r} (method {record.method!r}) to Hugging Face PEFT: only the LoRA family "
            f"({', '.join(_lora_family())}), ia3, vera and kasa have PEFT counterparts; save it with save_adapter."
        )
    use_dora = flags["use_dora"]
    modules = dict(walk(model))

    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts: set[float] = set()
    head_paths: list[str] = []
    for adapted in adapted_modules(model, name):
        path = adapted.path
        if adapted.head:
            head_paths.append(path)
            for k, v in adapted.parts[WHOLE].state_dict().items():
                tensors[f"{PREFIX}{path}.{k}"] = v.detach().cpu().contiguous()
            continue
        hf, info, scale, p = _export_module(adapted, use_dora)
        tensors.update({f"{PREFIX}{path}.{k}": v for k, v in hf.items()})
        layout[path] = info
        ranks[path] = info["rank"]
        alphas[path] = scale * info["rank"]
        dropouts.add(p)

    if not ranks:
        raise ConfigError(f"adapter {name!r} has no LoRA target to export.")
    for head in head_paths:
        _check_head_name(head, modules, list(ranks))
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(_clean(a) for a in alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts) if dropouts else 0.0,
        "target_modules": _target_modules(list(ranks), modules),
        "exclude_modules": None,
        "modules_to_save": head_paths or None,
        "rank_pattern": {_pattern_key(p, modules): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {_pattern_key(p, modules): _clean(a) for p, a in alphas.items() if _clean(a) != alpha},
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": all(is_conv1d(modules[p]) for p in ranks),
        "use_rslora": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    blob = save_bytes(tensors, metadata={"format": "pt"})
    as_lora = getattr(record.method_cls, "as_lora", None)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "vpeft_version": __version__,
        "adapter_name": name,
        "method": "lora" if as_lora else record.method,  # DyLoRA: the LoRA it is at its evaluation rank
        "options": config_to_dict(as_lora(record.config) if as_lora else record.config),
        "targets": record.targets,
        "heads": record.heads,
        "modules": layout,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    directory = Path(directory)
    # weights first, config last: a directory with a config always has the matching tensors
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    atomic_write(directory / SIDECAR_FILE, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _lora_family() -> list[str]:
    """The registered methods that export: those whose class declares a LoRA variant Hugging Face PEFT has."""
    return [name for name, cls in METHODS.items() if cls.lora_variant in PEFT_FLAGS]


def _export_module(adapted: AdaptedModule, use_dora: bool) -> tuple[dict[str, Tensor], dict[str, Any], float, float]:
    """HF tensors (``lora_A.weight``...), the sidecar layout, the scale and the dropout of one adapted module."""
    path, base = adapted.path, adapted.base
    if isinstance(base, nn.MultiheadAttention):
        raise ConfigError(
            f"cannot export LoRA on nn.MultiheadAttention {path!r} to Hugging Face PEFT: PEFT adapts an MHA's in- "
            "and out-projections together with its own layout. Exportable targets are nn.Linear, HF Conv1D and "
            "nn.Conv2d (dilation 1, groups 1); sliced fused qkv Linears export as block-structured LoRAs."
        )
    conv = isinstance(base, nn.Conv2d)
    if conv and (base.groups != 1 or tuple(base.dilation) != (1, 1)):
        raise ConfigError(
            f"cannot export LoRA on Conv2d {path!r} (groups={base.groups}, dilation={base.dilation}): "
            "Hugging Face PEFT's conv LoRA has no dilation; dilation 1, groups 1 export."
        )
    if not (conv or isinstance(base, nn.Linear) or is_conv1d(base)):
        raise ConfigError(f"cannot export LoRA on {type(base).__name__} {path!r}: export takes Linear, Conv1D, Conv2d")
    parts = adapted.parts
    unknown = [p for p in parts if p not in PART_ORDER]
    if unknown:
        raise ConfigError(f"cannot export part {unknown[0]!r} of {path!r} to Hugging Face PEFT.")
    weight, _ = weight_and_bias(base)  # (out, in, ...)
    out_full = weight.shape[0]
    a_list, b_list, info_parts = [], [], []
    scales, dropouts = set(), set()
    col, magnitude = 0, None
    for part in (p for p in PART_ORDER if p in parts):
        module = parts[part]
        a, b, scale = module.lora_factors()  # the update as it runs outside training (DyLoRA: at its eval rank)
        a, b = a.detach(), b.detach().reshape(b.shape[0], -1)  # conv B may be stored (out, r) or (out, r, 1, 1)
        rank = a.shape[0]
        rows = slice(0, out_full) if part == WHOLE else adapted.slices[part]
        full_b = torch.zeros(out_full, rank, dtype=b.dtype, device=b.device)
        full_b[rows] = b
        a_list.append(a)
        b_list.append(full_b)
        scales.add(float(scale))
        dropouts.add(float(getattr(module.dropout, "p", 0.0)))
        info_parts.append({"part": part, "rows": [rows.start, rows.stop], "cols": [col, col + rank]})
        col += rank
        if use_dora:
            mag = _magnitude(module, path).reshape(-1)
            if magnitude is None:  # untouched rows: the base row norms make DoRA an identity there
                magnitude = weight.detach().reshape(out_full, -1).norm(dim=1).to(mag.dtype)
            magnitude = magnitude.clone()
            magnitude[rows] = mag
    if len(scales) != 1:
        raise ConfigError(f"the parts of {path!r} have LoRA scales {sorted(scales)}; HF PEFT has one per module.")
    a = torch.cat(a_list, 0)
    b = torch.cat(b_list, 1)
    if conv:
        b = b[:, :, None, None]
    hf = {"lora_A.weight": a.cpu().contiguous(), "lora_B.weight": b.cpu().contiguous()}
    if magnitude is not None:
        hf["lora_magnitude_vector"] = (magnitude[None, :, None, None] if conv else magnitude).cpu().contiguous()
    info = {"kind": "conv2d" if conv else "linear", "rank": col, "parts": info_parts}
    return hf, info, scales.pop(), max(dropouts)


def _magnitude(module: nn.Module, path: str) -> Tensor:
    value = getattr(module, _MAGNITUDE_KEY, None)
    if isinstance(value, Tensor):
        return value.detach()
    raise ConfigError(f"cannot find the DoRA magnitude of {path!r} ({type(module).__name__}) to export.")


def _clean(x: float) -> float | int:
    """``8.0`` as ``8`` (HF configs write integer alphas), other values unchanged."""
    return int(x) if float(x).is_integer() else float(x)


def _target_modules(paths: list[str], modules: dict[str, nn.Module]) -> list[str] | str:
    """Exact names: HF PEFT matches a list entry as the whole path or a dotted suffix; fall back to a full-match
    regex when one target path is also a suffix of another module's path."""
    if any(other != p and other.endswith("." + p) for p in paths for other in modules):
        return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
    return sorted(paths)


def _pattern_key(path: str, modules: dict[str, nn.Module]) -> str:
    """A rank_pattern / alpha_pattern key for ``path``: HF matches it as the regex ``(.*\\.)?(key)$``."""
    if sum(re.match(rf"(.*\.)?({path})$", other) is not None for other in modules) == 1:
        return path
    return re.escape(path)


def _check_head_name(head: str, modules: dict[str, nn.Module], targets: list[str]) -> None:
    """HF PEFT wraps every module whose path *ends with* a modules_to_save entry, and never adapts inside one."""
    clash = [p for p in modules if p.endswith(head) and p != head and not p.startswith(head + ".")]
    clash += [t for t in targets if re.match(rf"(^|.*\.){re.escape(head)}($|\..*)", t)]
    if clash:
        raise ConfigError(
            f"cannot export head {head!r} to Hugging Face PEFT: its modules_to_save matching (path suffix) would "
            f"also catch {clash[:3]}. Export without this head (apply the method with head=()) or rename modules."
        )


# ---------------------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------------------


def import_hf_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Report:
    """Rebuild the Hugging Face PEFT LoRA adapter in ``directory`` on ``model`` as vpeft adapter ``adapter_name``.

    With the ``vpeft_export.json`` that :func:`export_hf_peft` writes, the original vpeft adapter (sliced targets
    included) comes back with the same tensors; otherwise a whole-module LoRA is built on the saved modules. On any
    error the model is left unchanged.
    """
    directory = Path(directory)
    if adapter_name in adapter_names(model):
        raise ConfigError(
            f"the model already has an adapter named {adapter_name!r} "
            f"({adapter_record(model, adapter_name).method}); pass another adapter_name= or remove it with "
            "vpeft.delete_adapter(model, name)."
        )
    config, tensors = _read(directory)
    tensors = {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    sidecar = _read_sidecar(directory)
    if sidecar is not None:
        return _import_sidecar(model, directory, adapter_name, config, tensors, sidecar)
    return _import_whole(model, directory, adapter_name, config, tensors)


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p.name for p in (directory / "adapter_model.bin", directory / "adapter_model.pt") if p.is_file()]
        if pickles:
            raise DataError(
                f"{directory} holds only {pickles[0]}, a pickle; vpeft never unpickles adapter files (loading a pickle "
                "can run arbitrary code). Convert it to adapter_model.safetensors with PEFT "
                "(model.save_pretrained(dir, safe_serialization=True)) from an environment you trust."
            )
        raise MissingFileError(
            f"{weights_path} does not exist: not a Hugging Face PEFT adapter directory "
            f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    if not config_path.is_file():
        raise MissingFileError(f"{config_path} does not exist: not a Hugging Face PEFT adapter directory.")
    config = _read_json(config_path)
    if config.get("format") == "vpeft.adapter":
        raise DataError(f"{directory} is a vpeft adapter, not a Hugging Face PEFT one: use vpeft.load_adapter.")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise DataError(
            f"{config_path} has peft_type {config.get('peft_type')!r}; vpeft imports only Hugging Face "
            "PEFT LORA adapters (with use_dora when vpeft's 'dora' method is available)."
        )
    return config, load_bytes(weights_path.read_bytes())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        value = err
    if not isinstance(value, dict):
        raise DataError(f"{path} does not hold a JSON object ({value}); re-export the adapter.")
    return value


def _read_sidecar(directory: Path) -> dict[str, Any] | None:
    path = directory / SIDECAR_FILE
    if not path.is_file():
        return None
    sidecar = _read_json(path)
    if sidecar.get("format") != SIDECAR_FORMAT or sidecar.get("format_version", 0) > SIDECAR_VERSION:
        log.warning(
            "vpeft: ignoring %s (format %r, version %r)", path, sidecar.get("format"), sidecar.get("format_version")
        )
        return None
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    if digest != sidecar.get("weights_sha256"):
        log.warning(
            "vpeft: %s does not describe the current %s (it was saved again after the export); importing "
            "it as whole-module LoRA",
            path,
            WEIGHTS_FILE,
        )
        return None
    return sidecar


def _import_sidecar(
    model: nn.Module,
    directory: Path,
    adapter_name: str,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    sidecar: dict[str, Any],
) -> Report:
    """Rebuild the exported vpeft adapter (its method, options, sliced targets) and split the tensors back."""
    method = sidecar["method"]
    if method not in METHODS:
        raise DataError(f"{directory} was exported from a vpeft {method!r} adapter, a method this vpeft lacks.")
    modules = dict(walk(model))
    converted: dict[str, Tensor] = {}
    for path, info in sidecar["modules"].items():
        a, b = tensors.get(f"{path}.lora_A.weight"), tensors.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            raise DataError(
                f"{directory}: {WEIGHTS_FILE} lacks the LoRA tensors of {path!r} that {SIDECAR_FILE} lists."
            )
        b = b.reshape(b.shape[0], -1)
        mag = tensors.get(f"{path}.lora_magnitude_vector")
        for part in info["parts"]:
            rows, cols = slice(*part["rows"]), slice(*part["cols"])
            key = f"{path}.{part['part']}"
            converted[f"{key}.lora_A"] = a[cols]
            converted[f"{key}.lora_B"] = b[rows, cols]
            if mag is not None:
                converted[f"{key}.{_MAGNITUDE_KEY}"] = mag.reshape(-1)[rows]
    heads = list(sidecar["heads"])
    for key, value in tensors.items():
        if any(key.startswith(h + ".") for h in heads):
            converted[key] = value

    options = dict(sidecar["options"])
    record_ok = False
    try:  # the original options first, so that the rebuilt adapter is configured as the exported one
        _add(model, method, adapter_name, options)
        record = adapter_record(model, adapter_name)
        record_ok = record.targets == sidecar["targets"] and record.heads == heads
        if not record_ok:
            delete_adapter(model, adapter_name)
    except (ValueError, TypeError) as err:
        log.info("vpeft: the exported options do not resolve on this model (%s); using the exported targets", err)
    if not record_ok:
        explicit = dict(
            options,
            targets=[_exact_key(t, modules) for t in sidecar["targets"]],
            head=[_exact(h, modules) for h in heads],
            exclude=[],
            layers=None,
            target_types=[],
        )
        try:
            _add(model, method, adapter_name, explicit)
        except ValueError as err:
            raise ConfigError(f"cannot import the adapter in {directory}: {err}") from None
    return _fill(model, adapter_name, converted, directory)


def _import_whole(
    model: nn.Module, directory: Path, adapter_name: str, config: dict[str, Any], tensors: dict[str, Tensor]
) -> Report:
    """A whole-module vpeft LoRA on every module with saved ``lora_A``/``lora_B``, plus the saved head."""
    unsupported = {
        "lora_bias": "a bias on lora_B",
        "use_qalora": "QA-LoRA",
        "target_parameters": "LoRA on parameters",
        "trainable_token_indices": "trainable tokens",
        "layer_replication": "layer replication",
        "use_bdlora": "block-diagonal LoRA",
        "alora_invocation_tokens": "activated LoRA",
        "velora_config": "VeLoRA",
        "kasa_config": "KaSA",
        "arrow_config": "Arrow",
    }
    for field, what in unsupported.items():
        if config.get(field):
            raise DataError(f"cannot import {directory}: it uses {what} ({field}), which vpeft's LoRA lacks.")
    if config.get("bias", "none") != "none":
        raise DataError(
            f"cannot import {directory}: bias={config['bias']!r} trains base biases; vpeft imports "
            "bias='none' LoRA adapters (use vpeft's bitfit for biases)."
        )
    use_dora = bool(config.get("use_dora"))
    method = "dora" if use_dora else "lora"
    if method not in METHODS:
        raise DataError(f"cannot import {directory}: it is a DoRA adapter (use_dora) and vpeft has no 'dora' method.")

    modules = dict(walk(model))
    lora_keys = {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    targets: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in tensors.items():
        suffix = next((s for s in lora_keys if key.endswith("." + s)), None)
        if suffix is not None:
            targets.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
        elif ".lora_" in key:
            raise DataError(
                f"cannot import {directory}: tensor {key!r} is of a LoRA kind vpeft lacks "
                "(embedding LoRA, lora_B bias...)."
            )
        else:
            rest[key] = value
    if not targets:
        raise DataError(f"cannot import {directory}: {WEIGHTS_FILE} holds no lora_A/lora_B tensors.")
    order = {p: i for i, p in enumerate(modules)}  # model order, as vpeft lists targets
    targets = dict(sorted(targets.items(), key=lambda kv: order.get(kv[0], len(order))))

    # ranks and scales: one r and one alpha/r for all modules, as vpeft's LoRA config has
    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rs, scales = {}, {}
    for path, parts in targets.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise DataError(f"cannot import {directory}: {path!r} lacks lora_A or lora_B.")
        saved_r = parts["lora_A.weight"].shape[0]
        r_cfg = int(rank_pattern.get(_hf_pattern_key(rank_pattern, path), r_default))
        if r_cfg != saved_r:
            raise DataError(f"cannot import {directory}: {path!r} has lora_A of rank {saved_r}, config says {r_cfg}.")
        alpha = float(alpha_pattern.get(_hf_pattern_key(alpha_pattern, path), alpha_default))
        rs[path] = saved_r
        scales[path] = alpha / math.sqrt(saved_r) if config.get("use_rslora") else alpha / saved_r
    if len(set(rs.values())) > 1 or len(set(scales.values())) > 1:
        raise DataError(
            f"cannot import {directory}: its modules have different ranks {sorted(set(rs.values()))} or scales "
            f"{sorted(set(scales.values()))}, and a vpeft LoRA adapter has one r and one alpha for all targets."
        )
    r = next(iter(rs.values()))
    scale = next(iter(scales.values()))

    heads = _heads_from_file(rest, config.get("modules_to_save") or [], modules, directory)
    converted: dict[str, Tensor] = {}
    for path, parts in targets.items():
        if path not in modules:
            raise DataError(
                f"cannot import {directory}: the model ({type(model).__qualname__}) has no module {path!r}."
            )
        base = modules[path]
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or tuple(base.dilation) != (1, 1)):
            raise DataError(
                f"cannot import {directory}: Conv2d {path!r} has groups/dilation, which HF PEFT's conv "
                "LoRA ignores and vpeft's honours; the outputs would differ."
            )
        b = parts["lora_B.weight"]
        converted[f"{path}.{WHOLE}.lora_A"] = parts["lora_A.weight"]
        converted[f"{path}.{WHOLE}.lora_B"] = b.reshape(b.shape[0], -1)
        if "lora_magnitude_vector" in parts:
            converted[f"{path}.{WHOLE}.{_MAGNITUDE_KEY}"] = parts["lora_magnitude_vector"].reshape(-1)
    converted.update(rest)
    options = {
        "targets": [_exact(p, modules) for p in targets],
        "r": r,
        "alpha": scale * r,
        "dropout": float(config.get("lora_dropout", 0.0)),
        "head": [_exact(h, modules) for h in heads],
    }
    try:
        _add(model, method, adapter_name, options)
    except ValueError as err:
        raise ConfigError(f"cannot import the adapter in {directory}: {err}") from None
    return _fill(model, adapter_name, converted, directory)


def _add(model: nn.Module, method: str, adapter_name: str, options: dict[str, Any]) -> None:
    """Build registered method ``method`` with ``options`` on ``model`` through the core, as vpeft.apply_method does."""
    cls = lookup(METHODS, method, "method")
    add_adapter(model, cls, method, build_config(cls.Config, options, method), adapter_name)


def _fill(model: nn.Module, adapter_name: str, converted: dict[str, Tensor], directory: Path) -> Report:
    """Copy the converted tensors into the freshly built adapter; on a mismatch remove it again."""
    try:
        load_adapter_tensors(model, adapter_name, converted, str(directory))
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    return report(model, adapter_name)


def _heads_from_file(
    rest: dict[str, Tensor], modules_to_save: list[str], modules: dict[str, nn.Module], directory: Path
) -> list[str]:
    """The module paths the non-LoRA tensors belong to; each must be a modules_to_save module (suffix match)."""
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    heads: list[str] = []
    for key in rest:
        owners = [p for p in modules if key.startswith(p + ".") and any(p.endswith(m) for m in modules_to_save)]
        if not owners:
            raise DataError(
                f"cannot import {directory}: tensor {key!r} is neither LoRA nor part of a "
                f"modules_to_save module ({modules_to_save})."
            )
        owner = min(owners, key=len)  # the outermost module that modules_to_save names
        if owner not in heads:
            heads.append(owner)
    return heads


def _hf_pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The rank_pattern / alpha_pattern key HF PEFT would use for ``path`` (first key matching as a suffix regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _exact(path: str, modules: dict[str, nn.Module]) -> str:
    """A vpeft target/head pattern that selects exactly ``path``: the path itself, or an escaped full-match regex
    where the plain path would also be a role name or the suffix of another module's path."""
    if path in ROLES or any(other != path and other.endswith("." + path) for other in modules):
        return f"(?:{re.escape(path)})"
    return path


def _exact_key(key: str, modules: dict[str, nn.Module]) -> str:
    """``_exact`` for a target key that may carry a slice (``blocks.0.attn.qkv[q]``)."""
    m = re.match(r"^(.+)\[(\w+)\]$", key)
    return f"{_exact(m[1], modules)}[{m[2]}]" if m else _exact(key, modules)
