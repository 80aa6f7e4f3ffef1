"""Controllers: code that changes an adapter's trainable set while it trains, and the one loop callback they use.

The training loop (and a loop of one's own) calls :func:`control` at the start of every optimizer step, before the
step's forward passes, with a :class:`StepContext`: the model, the number of steps done, the step's first batch, the
task's loss as a function of a batch, and the validation batches. :func:`control` runs the active method's
``AdapterModule.control`` hook and then every extra callback (``callbacks=``, a ``callable(ctx) -> str | None``),
all with the same context; a callback that changed something returns a line that says what (None otherwise).

A controller changes the trainable set in one of three ways, each of which the optimiser follows:

* **freeze / unfreeze** (IST's layer selection): ``requires_grad`` off or on. The optimiser keeps a frozen tensor
  and its state; a tensor without a gradient takes no step (``torch.optim`` skips it: AdamW neither moves nor decays
  it), so unfreezing it resumes its moments where they were.
* **resize** (prune or grow ranks, drop whole modules as rank 0): :meth:`StepContext.resize` puts a new parameter in
  place of a module's, built from the old one by an index per dimension (the old position of each new entry, -1 for a
  new entry, whose value comes from ``fill``). :meth:`StepContext.follow` then swaps it into the optimiser in place
  (same param group, so the schedule and the group's options are kept) and gathers every state tensor of the old
  parameter's shape (AdamW's ``exp_avg`` and ``exp_avg_sq``) by the same index: surviving entries keep their moments,
  pruned ones are dropped, new ones start at zero; scalar state (AdamW's ``step``) is kept.
* **structure in the config**: a controller that changes shapes records the new structure in the adapter's config
  (:meth:`StepContext.set_config`, e.g. per-target ranks), so a checkpoint, a saved adapter and ``--resume`` rebuild
  the adapter at its current shapes (:func:`rebuild_adapter`) before loading its tensors.

A controller's own state (importance scores) lives in persistent buffers of its modules, so checkpoints carry it, and
its random draws come from generators seeded by (seed, step): a resumed run makes the same decisions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import build_config
from .inject import active_adapter, adapter_record, add_adapter, delete_adapter, layers_of, state_of


@dataclass
class StepContext:
    """What a controller sees at the start of an optimizer step.

    ``step``: optimizer steps done so far (0 before the first); ``batch``: the step's first (micro-)batch on the
    device; ``loss(batch)``: the task's loss of the model on a batch (differentiable); ``val_batch(i)``: the ``i``-th
    validation batch (modulo their number) on the device, or None without a validation split."""

    model: nn.Module
    step: int
    total_steps: int
    batch: Any = None
    loss: Callable[[Any], Tensor] | None = None
    val_batch: Callable[[int], Any] | None = None
    notes: list[str] = field(default_factory=list)
    resized: list[tuple[nn.Parameter, nn.Parameter, tuple[Tensor | None, ...]]] = field(default_factory=list)

    @property
    def adapter(self) -> str:
        return active_adapter(self.model)

    def set_config(self, config: Any) -> None:
        """Record the active adapter's new structure (its config), so that checkpoints and saved files rebuild it."""
        adapter_record(self.model, self.adapter).config = config

    def resize(
        self, module: nn.Module, attr: str, index: tuple[Tensor | None, ...], fill: Tensor | None = None
    ) -> nn.Parameter:
        """Replace ``module.<attr>`` by a parameter whose entry at each position is the old one at ``index`` (one
        LongTensor per dimension, or None for a dimension that stays as it is; -1 marks a new entry, taken from
        ``fill``, a tensor of the new shape). Returns the new parameter; :meth:`follow` updates the optimiser."""
        old = getattr(module, attr)
        with torch.no_grad():
            value = gather(old.detach(), index, fill)
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(module, attr, new)
        self.resized.append((old, new, index))
        return new

    def follow(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Swap the resized parameters into ``optimizer`` in place, their state gathered (see the module's text)."""
        if optimizer is not None:
            for old, new, index in self.resized:
                swap_parameter(optimizer, old, new, index)
        self.resized.clear()


def gather(old: Tensor, index: tuple[Tensor | None, ...], fill: Tensor | None = None) -> Tensor:
    """``old`` re-indexed per dimension (``index`` as in :meth:`StepContext.resize`); new entries (-1) from ``fill``
    (zeros without one)."""
    out, fresh = old, None
    for dim, idx in enumerate(index):
        if idx is None:
            continue
        idx = idx.to(old.device)
        out = out.index_select(dim, idx.clamp(min=0))
        shape = [1] * old.dim()
        shape[dim] = idx.numel()
        new_here = (idx < 0).view(shape)
        fresh = new_here if fresh is None else fresh | new_here
    if fresh is None:
        return out.clone()
    fresh = fresh.expand(out.shape)
    source = fill.to(out) if fill is not None else torch.zeros_like(out)
    return torch.where(fresh, source, out)


def swap_parameter(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, index: tuple[Tensor | None, ...]
) -> None:
    """Put ``new`` where ``old`` is in ``optimizer``'s param groups, with ``old``'s state gathered by ``index``; a
    parameter the optimiser does not hold is left out (it was not trainable when the optimiser was built)."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state:
                    optimizer.state[new] = {
                        k: gather(v, index) if torch.is_tensor(v) and v.shape == old.shape else v
                        for k, v in state.items()
                    }
                return


Callback = Callable[[StepContext], "str | None"]


def control(model: nn.Module, ctx: StepContext, callbacks: Iterable[Callback] = ()) -> list[str]:
    """Run the active method's ``control`` hook, then each of ``callbacks``, at the start of step ``ctx.step``;
    returns what they changed (one line each). The caller then calls ``ctx.follow(optimizer)``."""
    state = state_of(model)
    name = state.switch.active
    record = state.adapters[name]
    said = record.method_cls.control(record.config, layers_of(model, name), ctx)
    if said:
        ctx.notes.append(said)
    for callback in callbacks:
        said = callback(ctx)
        if said:
            ctx.notes.append(said)
    return ctx.notes


def trainable_count(model: nn.Module) -> int:
    """Elements of the tensors that train now (``requires_grad``), heads and trained base tensors included."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rebuild_adapter(model: nn.Module, options: dict[str, Any], name: str | None = None) -> bool:
    """Rebuild adapter ``name`` (default: the active one) from ``options`` (a saved config, as ``config_to_dict``
    writes it) when they differ from its live config: its modules are made again at the shapes the options say (a
    controller's per-target ranks) and hold fresh values, which the caller then loads from its file. Returns whether
    it was rebuilt."""
    name = name or active_adapter(model)
    record = adapter_record(model, name)
    config = build_config(record.method_cls.Config, options, record.method)
    if config == record.config:
        return False
    if len(state_of(model).adapters) > 1:
        raise ValueError(f"rebuild_adapter: the model holds {len(state_of(model).adapters)} adapters; one is rebuilt "
                         "in place only when it is the model's only adapter.")  # fmt: skip
    method, cls = record.method, record.method_cls
    delete_adapter(model, name)
    add_adapter(model, cls, method, dataclasses.replace(config), name, prepared=True)
    return True
