"""Adding, switching, merging and removing named adapters on a model.

All state lives in one :class:`PeftState` kept on the model as ``model._vpeft``: the records of its adapters, the
switch its wrappers share, the ``requires_grad`` flags it had before vpeft touched it, and, after a merge, what the
merge took out. Every change is validated before the model is touched, so an error leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from .config import MethodConfig, check_ranks, config_to_dict
from .layers import Adapted, AdaptedMHA, AdapterModule, AdapterRecord, HeadCopies, Prepared, Switch
from .modules import WHOLE, fused_parts
from .report_table import Report
from .roles import ROLES
from .targets import SHARED, find_heads, name_matches, select_targets, walk
from .virtual import input_embedding, install_hooks, require_call_site

log = logging.getLogger("vpeft")
STATE = "_vpeft"
_ADAPTER_NAME = re.compile(r"^[A-Za-z_][\w-]*$")


@dataclass
class PeftState:
    switch: Switch
    original_requires_grad: dict[str, bool]
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    merged: list[tuple[str, Adapted]] | None = None  # wrappers a merge took out, for unmerge
    merged_shared: nn.Module | None = None
    call_hooks: list[Any] | None = None  # the call site's hooks while an adapter has virtual tokens (virtual.py)


def state_of(model: nn.Module, required: bool = True) -> PeftState | None:
    state = model.__dict__.get(STATE)
    if state is None and required:
        raise ValueError("this model has no vpeft adapter; call vpeft.apply_method(model, ...) first.")
    return state


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter that runs and trains."""
    return state_of(model).switch.active


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters in the order they were added; empty for a model without any."""
    state = state_of(model, required=False)
    return list(state.adapters) if state is not None else []


def adapter_record(model: nn.Module, name: str | None = None) -> AdapterRecord:
    """What adapter ``name`` (default: the active one) is: its method, config, targets and heads."""
    state = state_of(model)
    name = name or state.switch.active
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; the model has {list(state.adapters)}.")
    return state.adapters[name]


def unmerged_adapter(model: nn.Module, name: str | None, action: str) -> tuple[str, AdapterRecord]:
    """Adapter ``name`` (default: the active one) and its record; it must exist and not be merged, for ``action``."""
    name = name or active_adapter(model)
    record = adapter_record(model, name)
    if state_of(model).merged is not None:
        raise ValueError(f"the adapter is merged into the base weights; vpeft.unmerge(model) before {action} it.")
    return name, record


@dataclass(frozen=True)
class AdaptedModule:
    """One module of the model that an adapter changes, as code outside the core (a file converter) reads it."""

    path: str  # logical module path
    base: nn.Module  # the model's own module
    parts: dict[str, AdapterModule]  # WHOLE or a slice (q, k, v, out_proj) -> the adapter's module there
    slices: dict[str, slice]  # each slice of a fused projection -> its output rows; empty for other modules
    head: bool  # a task head: ``parts[WHOLE]`` is the adapter's own trained copy of ``base``


def adapted_modules(model: nn.Module, name: str) -> Iterator[AdaptedModule]:
    """Every module adapter ``name`` changes, heads included, in model order."""
    for path, _, _, wrapper in wrappers(model):
        if name in wrapper.adapters:
            parts = dict(wrapper.adapters[name].items())
            yield AdaptedModule(path, wrapper.base_layer, parts, dict(wrapper.slices), isinstance(wrapper, HeadCopies))


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Adapted]]:
    """``(logical path, parent, attribute, wrapper)`` for every wrapper in the model."""

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, Adapted]]:
        for name, child in list(module._modules.items()):
            if child is None or (name == SHARED and prefix == ""):
                continue
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, Adapted):
                yield path, module, name, child
                child = child.base_layer
            yield from visit(child, path)

    yield from visit(model, "")


def layers_of(model: nn.Module, name: str) -> list[AdapterModule]:
    """The adapter modules of adapter ``name``, in model order (heads excluded)."""
    return [module for adapted in adapted_modules(model, name) if not adapted.head for module in adapted.parts.values()]


def shared_of(model: nn.Module, name: str) -> nn.Module | None:
    """The tensors adapter ``name`` shares across its targets (FacT's factors), or None."""
    container = model._modules.get(SHARED)
    return container[name] if container is not None and name in container else None


def add_adapter(
    model: nn.Module,
    method_cls: type[AdapterModule],
    method: str,
    config: MethodConfig,
    adapter_name: str = "default",
    calibration: Any = None,
    prepared: bool = False,
) -> Report:
    """Attach a new named adapter and make it the active (and only trainable) one."""
    state = state_of(model, required=False)
    if not _ADAPTER_NAME.match(adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} must be an identifier (letters, digits, _ and -).")
    if state is not None:
        if state.merged is not None:
            raise ValueError("this model holds a merged adapter; call vpeft.unmerge(model) before adding another.")
        if adapter_name in state.adapters:
            raise ValueError(
                f"the model already has an adapter named {adapter_name!r} ({state.adapters[adapter_name].method}); "
                "pass another adapter_name= or remove it with vpeft.delete_adapter(model, name)."
            )
        if not method_cls.restorable or any(not r.method_cls.restorable for r in state.adapters.values()):
            raise ValueError(f"{method!r} cannot share a model with other adapters: one of them trains base tensors.")
        if method_cls.releases_base or any(r.method_cls.releases_base for r in state.adapters.values()):
            raise ValueError(
                f"{method!r} cannot share a model with other adapters: one of them replaces the base weights by a "
                "quantised copy (vpeft/core/layers.py, a replaced base)."
            )

    if method_cls.virtual:
        require_call_site(model, method)  # before target selection: the reason is the model, not a name
    method_cls.restructure(config, model)  # the base at the config's structure (pruned heads) before its targets
    targets = select_targets(model, config, method_cls, method)
    if not prepared:  # a loaded adapter's config already holds what prepare() decided
        if method_cls.needs_calibration and calibration is None:
            raise ValueError(
                f"method {method!r} needs calibration data: vpeft.apply_method(model, {method!r}, "
                "calibration=batches), with batches an iterable of (inputs, targets) pairs or of callables that "
                "take the model and return a loss."
            )
        check_ranks(config, targets, method, warn=False)  # before prepare's SVDs or calibration (PiSSA, CorDA)
        decided = method_cls.prepare(config, model, targets, calibration)
        per_target = {}
        if isinstance(decided, Prepared):  # per-target state besides the config (AdapterModule.prepare)
            decided, per_target = decided.config, decided.per_target
        if decided != config:
            config, targets = decided, select_targets(model, decided, method_cls, method)
        if per_target:
            unknown = sorted(set(per_target) - {t.key for t in targets})
            if unknown:
                raise ValueError(f"{method}: prepare() returned state for non-targets {unknown[:3]}")
            targets = [dataclasses.replace(t, init=per_target.get(t.key)) for t in targets]
    check_ranks(config, targets, method)  # before the first SVD or allocation of an update that does not fit
    heads = find_heads(model, config)
    trainable_base = method_cls.trainable_base(config, model)
    if method_cls.trains and not targets and not heads and not trainable_base:
        raise ConfigError(
            f"method {method!r} would train nothing on {type(model).__name__}: it adapts no module, and the model has "
            "no task head (none passed as head=, none reported by get_classifier(), no module named classifier or "
            "score). Name the layer to train with head=(...) (a causal LM's output layer: head=('lm_head',)), or "
            "use a method that adapts the model itself (lora)."
        )
    shared = method_cls.build_shared(config, targets)
    if shared is not None:
        _place_like(shared, model)
    layers = [_place_like(method_cls(t, config, shared), t.module) for t in targets]  # may fail: nothing installed yet
    site = _virtual_site(model, method, targets, layers)

    if state is None:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        state = PeftState(Switch(), flags)
        model.__dict__[STATE] = state
    state.adapters[adapter_name] = AdapterRecord(
        method, method_cls, config, [t.key for t in targets], heads, trainable_base
    )
    try:
        for target, layer in zip(targets, layers, strict=True):
            parts = _wrapper(model, target.name, state.switch).adapters
            if adapter_name not in parts:
                parts[adapter_name] = nn.ModuleDict()
            parts[adapter_name][target.part] = layer.train(target.module.training)  # new modules join in eval mode
        for head in heads:
            wrapper = _wrapper(model, head, state.switch, head=True)
            wrapper.add_copy(adapter_name)
        if shared is not None:
            if SHARED not in model._modules:
                model.add_module(SHARED, nn.ModuleDict())
            model._modules[SHARED][adapter_name] = shared
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    for target, layer in zip(targets, layers, strict=True):  # last: nothing can fail after a weight is freed
        if layer.releases_base:  # the layer's full-precision weight goes; the module holds the only copy
            _wrapper(model, target.name, state.switch).release(layer)
    if site is not None and state.call_hooks is None:
        state.call_hooks = install_hooks(site)
    if state.switch.active is not None and state.switch.active != adapter_name:
        log.info("vpeft: adapter %r is now active and trainable; %r is frozen", adapter_name, state.switch.active)
    state.switch.active = adapter_name
    refreeze(model)
    return report(model, adapter_name)


def _place_like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` moved to the device and floating dtype of ``reference``'s first floating tensor, so an adapter added
    to a model already on a GPU, or already cast to float64 or bfloat16, computes where and as its base does."""
    tensors = itertools.chain(reference.parameters(), reference.buffers())
    first = next((t for t in tensors if t.is_floating_point()), None)
    return module if first is None else module.to(device=first.device, dtype=first.dtype)


def _virtual_site(model: nn.Module, method: str, targets: list[Any], layers: list[AdapterModule]) -> nn.Module | None:
    """The call site whose calls an adapter with virtual tokens rewrites, or None for other adapters; the module that
    holds the virtual tokens must sit on the input embedding of that site (vpeft/core/virtual.py)."""
    virtual = [t for t, layer in zip(targets, layers, strict=True) if layer.virtual]
    if not virtual:
        return None
    site = require_call_site(model, method)
    embedding = input_embedding(site)
    if len(virtual) != 1 or virtual[0].module is not embedding:
        raise ConfigError(
            f"method {method!r} adds virtual tokens at the input token embedding of {type(site).__name__}, "
            f"{type(embedding).__name__}; its targets select {[t.key for t in virtual]}. Leave targets at its default "
            "('embed') or name that embedding alone."
        )
    return site


def _wrapper(model: nn.Module, path: str, switch: Switch, head: bool = False) -> Adapted:
    """The wrapper at logical ``path``, created in place of the module there when there is none."""
    parent, attr = _locate(model, path)
    child = parent._modules[attr]
    if isinstance(child, Adapted):
        if isinstance(child, HeadCopies) != head:
            raise ValueError(f"{path!r} is a head of one adapter and a target of another; exclude it from one.")
        return child
    if head:
        wrapper: Adapted = HeadCopies(child, switch)
    elif isinstance(child, nn.MultiheadAttention):
        wrapper = AdaptedMHA(child, switch, fused_parts(child))
    else:
        wrapper = Adapted(child, switch, fused_parts(child))
    parent._modules[attr] = wrapper.train(child.training)
    return wrapper


def _locate(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent = model
    *above, attr = path.split(".")
    for piece in above:
        parent = parent._modules[piece]
        if isinstance(parent, Adapted):
            parent = parent.base_layer
    if isinstance(parent, Adapted):
        parent = parent.base_layer
    return parent, attr


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; wrappers left empty are replaced by their base modules again."""
    state = state_of(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; the model has {list(state.adapters)}.")
    if state.merged is not None:
        raise ValueError("unmerge the model (vpeft.unmerge) before deleting its adapter.")
    for _, parent, attr, wrapper in list(wrappers(model)):
        if name in wrapper.adapters:
            if wrapper.__dict__.get("released") is not None:  # the quantised base stays, as a plain weight
                wrapper.restore()
            del wrapper.adapters[name]
        if len(wrapper.adapters) == 0:
            parent._modules[attr] = wrapper.base_layer
    container = model._modules.get(SHARED)
    if container is not None and name in container:
        del container[name]
        if len(container) == 0:
            del model._modules[SHARED]
    for plugin in state.adapters[name].plugins.values():
        plugin.close()
    del state.adapters[name]
    if state.call_hooks is not None and not any(r.method_cls.virtual for r in state.adapters.values()):
        for handle in state.call_hooks:
            handle.remove()
        state.call_hooks = None
    if state.switch.active == name:
        state.switch.active = next(iter(state.adapters), None)
    if not state.adapters:
        for n, p in model.named_parameters():
            p.requires_grad_(state.original_requires_grad.get(n, p.requires_grad))
        del model.__dict__[STATE]
    else:
        refreeze(model)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` (and its head) the one that runs and trains; the others are frozen."""
    state = state_of(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; the model has {list(state.adapters)}.")
    if state.merged is not None:
        raise ValueError("the model holds a merged adapter; call vpeft.unmerge(model) before switching.")
    if state.switch.active != name:
        log.info("vpeft: adapter %r is now active and trainable; %r is frozen", name, state.switch.active)
    state.switch.active = name
    refreeze(model)


def refreeze(model: nn.Module) -> None:
    """Only the active adapter's tensors, its head copy and the base tensors its method trains require grad."""
    state = state_of(model)
    model.requires_grad_(False)
    name = state.switch.active
    if name is None:
        return
    for _, _, _, wrapper in wrappers(model):
        if name in wrapper.adapters:
            for p in wrapper.adapters[name].parameters():
                p.requires_grad_(True)
    shared = shared_of(model, name)
    if shared is not None:
        shared.requires_grad_(True)
    params = dict(model.named_parameters())
    for n in state.adapters[name].trainable_base:
        params[n].requires_grad_(True)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter and head copy is bypassed inside the block."""
    state = state_of(model)
    _check_restorable(state, "disable")
    previous, state.switch.disabled = state.switch.disabled, True
    try:
        yield
    finally:
        state.switch.disabled = previous


def merge(model: nn.Module) -> None:
    """Fold the active adapter into the base weights; the wrappers leave and the state dict has base keys only."""
    state = state_of(model)
    name = state.switch.active
    if state.merged is not None:
        raise ValueError("the model is already merged.")
    record = state.adapters[name]
    if not record.method_cls.mergeable:
        raise ValueError(
            f"method {record.method!r} (adapter {name!r}) cannot be merged into the base weights: its update is not "
            "a change of the wrapped layers' weights. Keep it unmerged, or save it with vpeft.save_adapter."
        )
    if len(state.adapters) > 1:
        raise ValueError(
            f"merge folds one adapter into weights that all adapters share; the model has "
            f"{list(state.adapters)}: delete the others first (vpeft.delete_adapter)."
        )
    taken = []
    for path, parent, attr, wrapper in list(wrappers(model)):
        if isinstance(wrapper, HeadCopies):
            parent._modules[attr] = wrapper.adapters[name][WHOLE]
        else:
            wrapper.fold(name)
            parent._modules[attr] = wrapper.base_layer
        taken.append((path, wrapper))
    state.merged, state.merged_shared = taken, model._modules.pop(SHARED, None)
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, True))


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: the original weights come back (to float rounding) and the adapter is live again."""
    state = state_of(model)
    if state.merged is None:
        raise ValueError("the model is not merged; nothing to unmerge.")
    name = state.switch.active
    _check_restorable(state, "unmerge")
    for path, wrapper in state.merged:
        parent, attr = _locate(model, path)
        parent._modules[attr] = wrapper
        if not isinstance(wrapper, HeadCopies):
            wrapper.fold(name, undo=True)
    if state.merged_shared is not None:
        model.add_module(SHARED, state.merged_shared)
    state.merged = state.merged_shared = None
    refreeze(model)


def _check_restorable(state: PeftState, action: str) -> None:
    record = state.adapters[state.switch.active]
    if not record.method_cls.restorable:
        raise ValueError(
            f"cannot {action}: method {record.method!r} trains or prunes the base weights in place, so there is "
            "no original model to return to."
        )


def method_loss(model: nn.Module, context: Any = None) -> Tensor | None:
    """The active adapter's extra loss: its method's term (a regulariser) plus each plug-in's, or None when there is
    none; the training loop adds it to the task loss. ``context`` is the step's ``LossContext``
    (:func:`vpeft.core.plugins.loss_context`); a method's ``loss`` gets it when its signature names ``context``."""
    state = state_of(model)
    name = state.switch.active
    record = state.adapters[name]
    cls = record.method_cls
    extra = {"context": context} if _takes_context(cls.loss) else {}
    terms = [cls.loss(record.config, layers_of(model, name), shared_of(model, name), **extra)]
    terms += [plugin.loss(context) for plugin in record.plugins.values()]
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _takes_context(function: Any) -> bool:
    return "context" in inspect.signature(function).parameters


def on_step(model: nn.Module, step: int, total_steps: int, optimizer: Any = None) -> None:
    """Tell the active method that optimizer step ``step`` of ``total_steps`` is about to run."""
    state = state_of(model)
    name = state.switch.active
    record = state.adapters[name]
    record.method_cls.on_step(record.config, layers_of(model, name), step, total_steps, optimizer)


def no_weight_decay(model: nn.Module) -> set[int]:
    """``id``s of the active adapter's parameters its method keeps out of weight decay (prompt tokens)."""
    name = state_of(model).switch.active
    return {
        id(p)
        for layer in layers_of(model, name)
        for n, p in layer.named_parameters()
        if n.rsplit(".", 1)[-1] in type(layer).no_weight_decay
    }


def lr_multipliers(model: nn.Module) -> dict[int, float]:
    """``id`` -> learning-rate multiplier of the active adapter's parameters that its method trains faster or slower
    (``AdapterModule.lr_multipliers``); a parameter not listed trains at the run's learning rate."""
    state = state_of(model, required=False)
    if state is None or state.switch.active is None:  # a plain model: nothing to scale
        return {}
    record = state.adapters[state.switch.active]
    factors = record.method_cls.lr_multipliers(record.config)
    return {
        id(p): float(factors[n.rsplit(".", 1)[-1]])
        for layer in layers_of(model, state.switch.active)
        for n, p in layer.named_parameters()
        if n.rsplit(".", 1)[-1] in factors
    }


def head_tensors(model: nn.Module) -> set[int]:
    """``id``s of the active adapter's own copy of the task head (what a linear probe trains): the run's
    ``optim.head_lr`` applies to them, so a method tuned at a low lr does not also slow its classifier."""
    state = state_of(model, required=False)
    if state is None or state.switch.active is None:
        return set()
    return {
        id(p)
        for adapted in adapted_modules(model, state.switch.active)
        if adapted.head
        for p in adapted.parts[WHOLE].parameters()
    }


def report(model: nn.Module, name: str | None = None) -> Report:
    """The trainable-parameter table of adapter ``name`` (default: the active one)."""
    state = state_of(model)
    name = name or state.switch.active
    record = state.adapters[name]
    rows: list[tuple[str, str, int]] = []
    heads: list[tuple[str, int]] = []
    for adapted in adapted_modules(model, name):
        for part, module in adapted.parts.items():
            count = sum(p.numel() for p in module.parameters())
            if adapted.head:
                heads.append((adapted.path, count))
            else:
                key = adapted.path if part == WHOLE else f"{adapted.path}[{part}]"
                rows.append((key, type(adapted.base).__name__, count))
    shared_count = sum(p.numel() for p in shared.parameters()) if (shared := shared_of(model, name)) else 0
    if shared_count:
        rows.append((SHARED, "shared", shared_count))
    params = dict(model.named_parameters())
    for n in record.trainable_base:
        rows.append((n, "base tensor", params[n].numel()))
    base_total = sum(p.numel() for n, p in params.items() if not _is_adapter_param(n))
    base_total += sum(w.__dict__.get("released_numel", 0) for *_, w in wrappers(model))  # held packed (releases_base)
    plugins = [f"{n} {config_to_dict(p.config)}" for n, p in record.plugins.items()]
    return Report(record.method, name, rows, heads, base_total, plugins)


def _is_adapter_param(name: str) -> bool:
    return ".adapters." in name or name.startswith(SHARED + ".")


def fsdp_units(model: nn.Module) -> set[nn.Module]:
    """The modules to make FSDP units of, so that no unit mixes frozen and trainable tensors.

    Each adapter module, head copy and shared-tensor container becomes a unit of its own (trainable), and so does each
    transformer block (its remaining tensors are the frozen base); what is left stays in the root unit. Use it as
    ``FSDP(model, auto_wrap_policy=ModuleWrapPolicy(...))``'s equivalent:
    ``functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in units)`` with ``units = fsdp_units(model)``,
    or with ``use_orig_params=True``.
    """
    units: set[nn.Module] = set()
    for _, _, _, wrapper in wrappers(model):
        for parts in wrapper.adapters.values():
            units.update(parts.values())
    shared = model._modules.get(SHARED)
    if shared is not None:
        units.update(shared.values())
    units.update(m for path, m in walk(model) if any(name_matches(path, p) for p in ROLES["block"]))
    return units
