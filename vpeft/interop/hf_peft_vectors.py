"""Hugging Face PEFT IA3, VeRA and KaSA directories, and the export entry point that picks the format by method.

:func:`export_hf_peft` writes ``ia3`` adapters as ``peft_type: "IA3"``, ``vera`` adapters as ``peft_type: "VERA"``,
``kasa`` as a LoRA with ``kasa_config``, and hands every other method to the LoRA exporter
(:mod:`vpeft.interop.hf_peft`). The mappings:

===============================================  ============================================================
vpeft                                            Hugging Face PEFT
===============================================  ============================================================
IA3 ``ia3_l`` (out,) on a target's output        ``base_model.model.<path>.ia3_l`` (out, 1)
IA3 ``ia3_l`` (in,) on a ``feedforward`` input   ``...ia3_l`` (1, in); ``<path>`` in ``feedforward_modules``
IA3 on slices ``path[k]``, ``path[v]``           one (out, 1) vector on the whole fused ``path``: the slices' vectors
                                                   on their rows, ones on the rows of untouched slices (exact)
VeRA ``vera_lambda_b`` (out,), ``_d`` (r,)       ``base_model.model.<path>.vera_lambda_b`` / ``vera_lambda_d``
VeRA shared ``vera_A`` (r, in), ``vera_B``       ``base_model.vera_A`` / ``base_model.vera_B`` (``save_projection``)
KaSA ``lora_A``, ``lora_B``, ``lora_diag``       ``...lora_A.weight``, ``...lora_B.weight``, ``...lora_diag``; a LoRA
                                                   config with ``kasa_config`` (PEFT truncates W when it loads)
head copy                                        ``base_model.model.<head>.<tensor>``; ``head`` in modules_to_save
===============================================  ============================================================

VeRA on slices of a fused projection is refused: PEFT keeps one ``d`` per module, and vpeft's slices each have one;
so is KaSA on slices or on GPT-2's Conv1D (PEFT truncates whole ``nn.Linear`` weights only).
Import of these formats into vpeft is not provided (``vpeft.import_hf_peft`` reads LoRA directories).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from ..core import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WHOLE,
    AdaptedModule,
    adapted_modules,
    is_conv1d,
    shared_of,
    unmerged_adapter,
    walk,
    weight_and_bias,
)
from ..errors import ConfigError
from ..files import atomic_write
from ..methods.ia3 import IA3
from ..methods.kasa import KaSA
from ..methods.vera import VeRA
from . import hf_peft, hf_peft_prompts
from .hf_peft import PREFIX

SHARED_PREFIX = "base_model."  # PEFT keeps VeRA's shared projections on the tuner, above the model


def export_hf_peft(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a Hugging Face PEFT directory.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then reproduces the vpeft model's outputs. The LoRA
    family exports as LoRA (``lora``, ``dora`` as ``use_dora``, ``ffa_lora``, ``dylora`` at its evaluation rank; see
    :mod:`vpeft.interop.hf_peft`), ``ia3`` as IA3, ``vera`` as VeRA and ``kasa`` as a LoRA with ``kasa_config`` (see
    this module's docstring), ``prompt_tuning`` and ``prefix_tuning`` as PROMPT_TUNING and PREFIX_TUNING
    (:mod:`vpeft.interop.hf_peft_prompts`).
    """
    name, record = unmerged_adapter(model, adapter_name, "exporting")
    if record.method_cls.virtual:  # prompt and prefix tuning
        return hf_peft_prompts.export_prompts(model, directory, name, record)
    if issubclass(record.method_cls, IA3):
        kind = "IA3"
    elif issubclass(record.method_cls, VeRA):
        kind = "VERA"
    elif issubclass(record.method_cls, KaSA):
        kind = "KASA"
    else:
        return hf_peft.export_hf_peft(model, directory, name)
    modules = dict(walk(model))
    tensors: dict[str, Tensor] = {}
    paths, feedforward, heads = [], [], []
    for adapted in adapted_modules(model, name):
        if adapted.head:
            heads.append(adapted.path)
            tensors.update(
                {f"{PREFIX}{adapted.path}.{k}": v.detach() for k, v in adapted.parts[WHOLE].state_dict().items()}
            )
            continue
        paths.append(adapted.path)
        if kind == "KASA":
            tensors.update(_kasa_tensors(adapted, modules))
        elif kind == "IA3":
            vector, is_ff = _ia3_vector(adapted)
            tensors[f"{PREFIX}{adapted.path}.ia3_l"] = vector
            if is_ff:
                feedforward.append(adapted.path)
        else:
            tensors.update(_vera_vectors(adapted))
    for head in heads:
        hf_peft._check_head_name(head, modules, paths)
    config = _common_config(model, paths, heads, modules)
    options = record.config
    if kind == "IA3":
        # a full-match regex: PEFT matches a feedforward *list* entry by plain str.endswith, without a dot boundary
        ff = "(?:" + "|".join(re.escape(p) for p in feedforward) + ")" if feedforward else []
        config.update({"peft_type": "IA3", "feedforward_modules": ff, "init_ia3_weights": True})
    elif kind == "KASA":
        config.update({
            "peft_type": "LORA", "r": options.r, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
            "kasa_config": {"beta": options.beta, "gamma": options.gamma}, "bias": "none", "use_dora": False,
            "use_rslora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
        })  # fmt: skip
    else:
        shared = shared_of(model, name)
        tensors[f"{SHARED_PREFIX}vera_A"] = shared.vera_A.detach()
        tensors[f"{SHARED_PREFIX}vera_B"] = shared.vera_B.detach()
        config.update({
            "peft_type": "VERA", "r": options.r, "projection_prng_key": options.projection_prng_key,
            "save_projection": True, "vera_dropout": options.dropout, "d_initial": options.d_initial,
            "bias": "none", "init_weights": True,
        })  # fmt: skip
    blob = save_bytes({k: v.cpu().contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    directory = Path(directory)
    # weights first, config last: a directory with a config always has the matching tensors
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def _common_config(model: nn.Module, paths: list[str], heads: list[str], modules: dict[str, nn.Module]) -> dict:
    if not paths:
        raise ConfigError("the adapter has no target module to export to Hugging Face PEFT.")
    return {
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "target_modules": hf_peft._target_modules(paths, modules),
        "exclude_modules": None,
        "modules_to_save": heads or None,
        "fan_in_fan_out": all(is_conv1d(modules[p]) for p in paths),
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _ia3_vector(adapted: AdaptedModule) -> tuple[Tensor, bool]:
    """PEFT's ``ia3_l`` of one module: (1, in) for an input vector, else (out, 1) with ones on untouched slices."""
    parts = adapted.parts
    if WHOLE in parts:
        module = parts[WHOLE]
        vector = module.ia3_l.detach()
        return (vector[None, :], True) if module.feedforward else (vector[:, None], False)
    out = weight_and_bias(adapted.base)[0].shape[0]
    first = next(iter(parts.values())).ia3_l
    vector = torch.ones(out, dtype=first.dtype, device=first.device)
    for part, module in parts.items():
        vector[adapted.slices[part]] = module.ia3_l.detach()
    return vector[:, None], False


def _kasa_tensors(adapted: AdaptedModule, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """PEFT's KaSA tensors of one whole Linear. PEFT truncates the module's whole weight when it loads the adapter,
    as vpeft does per target, so slices of a fused projection (whose weight vpeft truncates slice by slice) and
    GPT-2's Conv1D (which PEFT's KaSA refuses) cannot be written."""
    if WHOLE not in adapted.parts or is_conv1d(modules[adapted.path]):
        what = f"slices {sorted(adapted.parts)} of" if WHOLE not in adapted.parts else "the Conv1D"
        raise ConfigError(
            f"cannot export KaSA on {what} {adapted.path!r} to Hugging Face PEFT: PEFT's KaSA truncates whole "
            "nn.Linear weights only, and vpeft truncated each slice on its own. Apply kasa to whole nn.Linear "
            "modules to export it, or save it with vpeft.save_adapter."
        )
    module, prefix = adapted.parts[WHOLE], f"{PREFIX}{adapted.path}"
    return {
        f"{prefix}.lora_A.weight": module.lora_A.detach(),
        f"{prefix}.lora_B.weight": module.lora_B.detach(),
        f"{prefix}.lora_diag": module.lora_diag.detach(),
    }


def _vera_vectors(adapted: AdaptedModule) -> dict[str, Tensor]:
    if WHOLE not in adapted.parts:
        raise ConfigError(
            f"cannot export VeRA on slices {sorted(adapted.parts)} of {adapted.path!r} to Hugging Face PEFT: PEFT's "
            "VeRA has one d vector per module and vpeft has one per slice. Apply vera to the whole module "
            f"(targets=[{adapted.path.rsplit('.', 1)[-1]!r}]) to export it, or save it with vpeft.save_adapter."
        )
    module = adapted.parts[WHOLE]
    prefix = f"{PREFIX}{adapted.path}"
    return {f"{prefix}.vera_lambda_{v}": getattr(module, f"vera_lambda_{v}").detach() for v in "bd"}
