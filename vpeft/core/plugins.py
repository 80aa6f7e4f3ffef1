"""Plug-ins, and the loss context that a method's or a plug-in's loss reads.

A plug-in runs beside the active adapter, whatever its method: an extra loss term (DEFT's density loss, BA-LoRA's
regularisers), an activation tap that feeds one, or a perturbation of the weights during the step (LoRA-GGPO). It is
an option of the adapter: attached with :func:`add_plugin` (``vpeft.apply_method(..., plugins=[...])``), named in
:func:`vpeft.core.report`, saved in ``adapter_config.json`` under ``plugins`` and rebuilt by ``vpeft.load_adapter``;
with none attached nothing changes. The core knows no plug-in: :class:`Plugin` is the base class, the registry of
named plug-ins sits above the core (:mod:`vpeft.plugins`).

The loss context: a training step runs its task loss inside :func:`loss_context`, which records what the model's
outermost call took and returned (the step's ``outputs``: logits, hidden states), then hands the
:class:`LossContext` to :func:`vpeft.core.method_loss`. A method's ``AdapterModule.loss`` receives it as
``context=`` when its signature names that parameter (the older three-argument signature keeps working unchanged);
each plug-in's :meth:`Plugin.loss` always does. One mechanism serves both.

The step, in the order the training loop calls the hooks (``vpeft/engine/train.py``)::

    perturb(model)                          # Plugin.perturb: GGPO adds its noise to the weights
    for each micro-batch:
        with loss_context(model, batch) as context:   # Plugin.begin: taps record
            loss = task.loss(net, batch)               # the step's forward pass; context.outputs
        extra = method_loss(model, context=context)    # the method's loss + every Plugin.loss(context)
        backward
    restore(model)                          # Plugin.restore: GGPO takes its noise out before the optimiser step

A plug-in may also set the weight decay of some of the adapter's tensors (:meth:`Plugin.weight_decay`, gathered by
:func:`plugin_weight_decay`): the optimiser's parameter groups (:func:`vpeft.optim.param_groups`) give those tensors
that decay instead of the run's (STAR's decoupled decay on LoRA's B, :mod:`vpeft.plugins.lora_b_decay`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from .config import MethodConfig
from .inject import state_of


@dataclass
class LossContext:
    """What a training step's losses may read: the adapted ``model``, the task's ``batch``, and the ``args``,
    ``kwargs`` and ``outputs`` of the model's outermost call during the step (None before it ran)."""

    model: nn.Module
    batch: Any = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    outputs: Any = None

    @property
    def logits(self) -> Tensor:
        """The step's logits: the output itself when a tensor (vpeft's classifiers), else its ``logits`` field (a
        Hugging Face model output) or first element."""
        out = self.outputs
        if out is None:
            raise ValueError("the loss context holds no outputs: the model was not called inside loss_context().")
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]

    def rerun(self) -> Any:
        """The model's call again on the same inputs: under ``vpeft.disabled`` it is the base model's answer (BA-LoRA's
        frozen reference, with no second copy of the model)."""
        return self.model(*self.args, **self.kwargs)


class Plugin:
    """Base class of plug-ins. A subclass sets ``Config`` (a :class:`MethodConfig` subclass: its options, checked like
    a method's) and overrides what it needs. One instance is made per adapter it is attached to, with the model, so it
    can place hooks; :meth:`close` removes them."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.config = config

    def begin(self, context: LossContext) -> None:
        """The step's forward pass on one micro-batch is about to run (activation taps start recording)."""

    def end(self, context: LossContext) -> None:
        """That forward pass is over (taps stop recording; what they kept waits for :meth:`loss`)."""

    def loss(self, context: LossContext) -> Tensor | None:
        """This plug-in's term of the micro-batch's loss, or None; it is added to the task loss as it is."""
        return None

    def perturb(self, model: nn.Module) -> None:
        """Before the optimizer step's first forward pass: change the weights for this step's passes."""

    def restore(self, model: nn.Module) -> None:
        """After its last backward pass, before the optimizer step: undo :meth:`perturb` exactly."""

    def weight_decay(self, model: nn.Module) -> dict[int, float]:
        """``id`` -> weight decay of the tensors whose decay this plug-in sets (read when the optimiser is built);
        the others keep the run's ``optim.weight_decay``."""
        return {}

    def close(self) -> None:
        """The plug-in is removed: take out its hooks."""


def add_plugin(
    model: nn.Module, name: str, cls: type[Plugin], config: MethodConfig, adapter_name: str | None = None
) -> Plugin:
    """Attach plug-in ``cls`` (registered as ``name``) with ``config`` to adapter ``adapter_name`` (default: the
    active one); it runs while that adapter is active. One plug-in of a name per adapter."""
    state = state_of(model)
    adapter_name = adapter_name or state.switch.active
    record = state.adapters[adapter_name]
    if name in record.plugins:
        raise ValueError(f"adapter {adapter_name!r} already has plug-in {name!r}; each plug-in is attached once.")
    plugin = cls(model, config)
    record.plugins[name] = plugin
    return plugin


def plugins_of(model: nn.Module, adapter_name: str | None = None) -> dict[str, Plugin]:
    """The plug-ins of adapter ``adapter_name`` (default: the active one), by name; empty for a plain model."""
    state = state_of(model, required=False)
    if state is None:
        return {}
    name = adapter_name or state.switch.active
    return state.adapters[name].plugins if name in state.adapters else {}


@contextlib.contextmanager
def loss_context(model: nn.Module, batch: Any = None) -> Iterator[LossContext]:
    """Record the model's outermost call inside the block into the yielded :class:`LossContext`, with the active
    adapter's plug-ins told (``begin``/``end``) so that their taps record that pass only."""
    context = LossContext(model, batch)
    depth = [0]

    def enter(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if depth[0] == 0 and context.outputs is None:
            context.args, context.kwargs = args, dict(kwargs)
        depth[0] += 1

    def leave(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0 and context.outputs is None:
            context.outputs = output

    handles = [
        model.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),  # before any call rewrite: the inputs
        # as the caller gave them, so that rerun() goes through the rewrite (virtual tokens) again
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    ]
    plugins = list(plugins_of(model).values())
    for plugin in plugins:
        plugin.begin(context)
    try:
        yield context
    finally:
        for handle in handles:
            handle.remove()
        for plugin in plugins:
            plugin.end(context)


def perturb(model: nn.Module) -> None:
    """Let the active adapter's plug-ins change the weights for the coming optimizer step's passes (GGPO)."""
    for plugin in plugins_of(model).values():
        plugin.perturb(model)


def plugin_weight_decay(model: nn.Module) -> dict[int, float]:
    """``id`` -> weight decay set by the active adapter's plug-ins (:meth:`Plugin.weight_decay`); two plug-ins that
    set different decays for one tensor are an error."""
    out: dict[int, float] = {}
    for name, plugin in plugins_of(model).items():
        for key, value in plugin.weight_decay(model).items():
            if out.get(key, value) != value:
                raise ValueError(f"plug-in {name!r} sets a weight decay of {value} for a tensor that another "
                                 f"plug-in decays by {out[key]}; attach one of them.")  # fmt: skip
            out[key] = float(value)
    return out


def restore(model: nn.Module) -> None:
    """Undo :func:`perturb` before the optimizer step, in reverse order."""
    for plugin in reversed(list(plugins_of(model).values())):
        plugin.restore(model)
