"""The optimiser registry: ``OPTIMIZERS[name]`` is an :class:`OptimizerSpec`, its options checked like a method's.

A run names one in ``optim.name`` with its options beside it (``optim: {name: galore, rank: 128}``); from Python::

    model = vpeft.apply_method(model, "full", modules=("block",))     # full fine-tuning of the blocks only
    optimizer = vpeft.build_optimizer(model, "galore", lr=1e-3, rank=128, update_proj_gap=200)

* ``adamw``: ``torch.optim.AdamW`` (the default; no options).
* ``galore``: GaLore-Adam (galore.py), Zhao et al., ICML 2024, arXiv:2403.03507: Adam's moments of each projected
  weight live in a rank-``r`` projection of its gradient.
* ``natural_galore``: GaLore with a Woodbury natural-gradient step in the projected subspace (natural_galore.py),
  arXiv:2410.16029.
* ``gradnorm_lorp``: weight normalisation plus GaLore's projection of the direction's gradient (gradnorm_lorp.py),
  AAAI 2025, arXiv:2412.19616.

The projecting optimisers project the trainable 2-D tensors (weight matrices) inside the modules their ``targets``
match (roles, suffixes or regexes as a method's targets; the default, the role ``block``, is every transformer block,
so attention and MLP weights, the paper's choice) whose shorter side is longer than ``rank``; every other trainable
tensor (norms, biases, embeddings, the head, narrow matrices) takes the same Adam step unprojected. They are meant
for weights trained in place: the method ``full``, optionally limited to some modules (``full``'s ``modules``).

Parameter groups: no weight decay for 1-D tensors, timm's ``no_weight_decay()`` tokens and what a method keeps out of
decay; a method's learning-rate multipliers (``AdapterModule.lr_multipliers``) give groups of their own, and so do
the task head when ``head_lr`` sets it apart (the head a linear probe trains learns at the probe's rate while a
spectral method's factors train at a tenth of it) and the tensors whose decay a plug-in sets
(``Plugin.weight_decay``: STAR's decay on LoRA's B).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..core import (
    AdapterModule,
    MethodConfig,
    PositiveFloat,
    PositiveInt,
    adapter_names,
    build_config,
    head_tensors,
    lr_multipliers,
    no_weight_decay,
    plugin_weight_decay,
    select_targets,
)
from ..errors import ConfigError, OptionError
from ..registry import lookup
from .galore import LowRankAdamW
from .gradnorm_lorp import GradNormLoRPAdamW
from .natural_galore import NaturalGaLoreAdamW

__all__ = ["OPTIMIZERS", "OptimizerSpec", "build_optimizer", "optimizer_options", "param_groups"]
log = logging.getLogger("vpeft")


@dataclass
class AdamWOptions:
    """``torch.optim.AdamW`` takes only the run's ``lr``, ``weight_decay`` and ``betas``."""


@dataclass
class GaLoreOptions:
    """GaLore's options; the defaults are the paper's pre-training runs (galore.py)."""

    targets: tuple[str, ...] = ("block",)  # modules whose weight matrices are projected
    rank: PositiveInt = 128
    update_proj_gap: PositiveInt = 200  # steps between subspace refreshes (SVD of the gradient)
    scale: PositiveFloat = 0.25  # the paper's alpha, on the projected-back update
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    eps: PositiveFloat = 1e-6

    def check(self) -> None:
        if not self.targets:
            raise OptionError(
                "optimizer option targets must name at least one module pattern (e.g. ['block']).", "targets"
            )


@dataclass
class NaturalGaLoreOptions(GaLoreOptions):
    """Natural GaLore: GaLore's options, the two-sided projection, and the Fisher window (natural_galore.py)."""

    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "full"
    natural_history: PositiveInt = 20  # s, the projected gradients kept for the empirical Fisher
    damping: PositiveFloat = 1e-3  # lambda


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimiser: its options' dataclass and a builder ``make(groups, lr, betas, options)``; with
    ``projects`` the groups of projected tensors carry ``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` (and
    any other option the builder reads from its groups)."""

    Config: type
    make: Callable[[list[dict], float, tuple[float, float], Any], torch.optim.Optimizer]
    projects: bool = False
    group_options: tuple[str, ...] = ()


_LOW_RANK = ("rank", "update_proj_gap", "scale", "proj_type")
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(AdamWOptions, lambda groups, lr, betas, o: torch.optim.AdamW(groups, lr=lr, betas=betas)),
    "galore": OptimizerSpec(
        GaLoreOptions, lambda groups, lr, betas, o: LowRankAdamW(groups, lr, betas, o.eps), True, _LOW_RANK
    ),
    "natural_galore": OptimizerSpec(
        NaturalGaLoreOptions,
        lambda groups, lr, betas, o: NaturalGaLoreAdamW(groups, lr, betas, o.eps),
        True,
        (*_LOW_RANK, "natural_history", "damping"),
    ),
    "gradnorm_lorp": OptimizerSpec(
        GaLoreOptions, lambda groups, lr, betas, o: GradNormLoRPAdamW(groups, lr, betas, o.eps), True, _LOW_RANK
    ),
}


def optimizer_options(name: str, options: dict[str, Any]) -> Any:
    """The checked options of optimiser ``name``: an unknown name raises :class:`~vpeft.errors.UnknownNameError`, a
    bad option :class:`~vpeft.errors.OptionError` naming it (``error.option``)."""
    spec = lookup(OPTIMIZERS, name, "optimizer")
    return build_config(spec.Config, options, name, kind="optimizer")


class _AnyModule(AdapterModule):
    """Stands for "any module" when the optimiser resolves its ``targets`` with the core's target selection."""

    wraps = ("module",)


def projected_tensors(model: nn.Module, targets: tuple[str, ...], rank: int) -> dict[int, str]:
    """``id`` -> name of each trainable 2-D tensor inside the modules ``targets`` match whose shorter side exceeds
    ``rank``; a :class:`~vpeft.errors.ConfigError` when there is none."""
    try:
        found = select_targets(model, MethodConfig(targets=targets, head=()), _AnyModule, "optimizer")
    except ConfigError as err:
        raise ConfigError(f"optim.targets: {err}") from None
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    narrow: list[str] = []
    for target in found:
        for p in target.module.parameters():
            if p.requires_grad and p.ndim == 2 and id(p) not in seen:
                if min(p.shape) > rank:
                    seen[id(p)] = names[id(p)]
                else:
                    narrow.append(f"{names[id(p)]} ({p.shape[0]} x {p.shape[1]})")
    if not seen:
        why = (
            f"each trainable weight matrix there has a side of at most optim.rank = {rank} (e.g. {narrow[0]}); "
            "lower optim.rank"
            if narrow
            else "none of their weight matrices trains; a projecting optimiser trains weights in place: use the method "
            "full (optionally with modules: [...])"
        )
        raise ConfigError(f"optim.targets {list(targets)} give the optimiser no tensor to project: {why}.")
    if narrow:
        log.info("vpeft: %d matrices are not wider than optim.rank and take the plain Adam step", len(narrow))
    return seen


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    projected: set[int] | dict[int, str] = frozenset(),
    group_extra: dict[str, Any] | None = None,
    head_lr: float | None = None,
) -> list[dict]:
    """The trainable tensors of ``model`` in groups by (projected, decayed, learning-rate multiplier, a plug-in's
    decay), decayed first; a group with a multiplier sets its ``lr`` (``lr`` times it; needs ``lr``), the others take
    the optimiser's. A tensor whose decay a plug-in sets (:func:`vpeft.core.plugin_weight_decay`) takes that decay.
    ``group_extra`` goes into the groups of ``projected`` tensors; ``head_lr`` is the active adapter's task-head
    copy's learning rate (its multiplier is ``head_lr / lr``)."""
    active = bool(adapter_names(model))
    keep_out = no_weight_decay(model) if active else set()
    factors = lr_multipliers(model) if active else {}
    if head_lr is not None and active:
        if lr is None:
            raise ValueError("param_groups: head_lr is given relative to the run's lr; pass lr=")
        head = head_tensors(model)
        if not head:  # a causal LM's run: its output layer is the model's own, not a task head
            log.warning("vpeft: optim.head_lr=%g is not used: the model has no task head of this adapter", head_lr)
        factors.update(dict.fromkeys(head, head_lr / lr))
    decays = plugin_weight_decay(model) if active else {}
    base_tokens = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    buckets: dict[tuple[bool, bool, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        token = name.split(".")[-1] in base_tokens or name in base_tokens
        decay = not (p.ndim <= 1 or token or id(p) in keep_out)
        own = decays.get(id(p), -1.0)  # -1: the plug-ins leave this tensor's decay alone
        buckets.setdefault((id(p) in projected, not decay, factors.get(id(p), 1.0), own), []).append(p)
    groups = []
    for (is_projected, no_decay, factor, own), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        group = {"params": params, "weight_decay": own if own >= 0 else 0.0 if no_decay else weight_decay}
        if factor != 1.0:
            if lr is None:
                raise ValueError("param_groups: the model's method sets learning-rate multipliers; pass lr=")
            group["lr"] = lr * factor
        if is_projected:
            group.update(group_extra or {})
        groups.append(group)
    return groups


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    head_lr: float | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Optimiser ``name`` over the trainable tensors of ``model``, with its ``options`` (the keys of
    ``optim`` in a run config beside ``name``); ``head_lr``: the task head's own learning rate (default ``lr``)."""
    spec = lookup(OPTIMIZERS, name, "optimizer")
    config = optimizer_options(name, options)
    projected: dict[int, str] = {}
    extra = {}
    if spec.projects:
        projected = projected_tensors(model, config.targets, config.rank)
        extra = {key: getattr(config, key) for key in spec.group_options}
    return spec.make(param_groups(model, weight_decay, lr, projected, extra, head_lr), lr, betas, config)
