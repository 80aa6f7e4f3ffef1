"""Data-parallel training under ``torchrun``: process group, device, and the few collective operations the loop uses.

``torchrun --nproc_per_node=N tools/train.py CONFIG`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (gloo on CPU,
NCCL on GPU). ``data.batch_size`` is per process; only rank 0 writes files. ``train.parallel`` chooses how the
model is spread over the processes:

* ``ddp`` (default): every process holds the whole model; ``DistributedDataParallel`` averages the trainable tensors'
  gradients (``find_unused_parameters=False``: frozen tensors are not parameters DDP waits for, and every trainable
  tensor is used in each step, which the first-step gradient check enforces). Use it when the model fits on one
  device: it is the simplest and, for adapters, the fastest.
* ``fsdp``: ``fully_shard`` (FSDP2) cuts every tensor into one slice per process, so the frozen base, the adapters
  and the optimizer state take about ``1/N`` of the memory each; a block's base tensors are gathered just for its
  forward and backward. Use it when the base model does not fit on one device (a large language model). The units
  are ``vpeft.core.fsdp_units`` (each adapter, head copy, shared-tensor container and transformer block), then the
  root, so no unit mixes frozen and trainable tensors. An adapter's tensors are read by the wrapper around its
  target, by method losses and by the saved files, not only inside the adapter's own ``forward`` that FSDP hooks
  into; so the units holding trainable tensors are gathered whole when the model's forward starts and stay gathered
  until the backward pass has reduce-scattered their gradients (adapters are small: this costs little memory). The
  optimizer then steps on the slices; :meth:`Dist.full_tensors` gathers the adapter for saving, and the training
  checkpoint holds full tensors, so a run's files are those of a one-process run, load in one process, and
  ``--resume`` continues an FSDP run exactly. Every forward pass of a sharded model is a collective, so in evaluation
  every process runs as many batches (``engine.train.evaluate_split``) and a causal LM decodes in step
  (``synced_gpus``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..core import active_adapter, adapter_record, fsdp_units
from ..errors import ConfigError


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes (the tensor itself with one process)."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call in training: under DDP a wrapper around ``model``; under FSDP ``model`` itself, sharded
        in place (its parameters become slices, so build the optimizer after this)."""
        if self.world == 1:
            return model
        if self.parallel == "fsdp":
            shard(model)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    @contextlib.contextmanager
    def full_tensors(self, model: nn.Module) -> Iterator[None]:
        """Inside: every trainable tensor of a sharded ``model`` is whole on every process (collective: every process
        enters), so ``vpeft.save_adapter`` writes a one-process run's files. Nothing to do without FSDP.

        The sliced parameters are set aside and put back on exit; FSDP, which reads a unit's tensors as slices for
        ``state_dict``, finds every unit sliced (no forward pass is running) and leaves the whole ones in place.
        Each unit also shows its own class (``VisionTransformer``, not FSDP's ``FSDPVisionTransformer``), which the
        adapter config records.
        """
        sliced = [
            (module, name, p)
            for module in model.modules()
            for name, p in module.named_parameters(recurse=False)
            if isinstance(p, DTensor) and p.requires_grad
        ]
        whole = [nn.Parameter(p.full_tensor()) for _, _, p in sliced]
        units = [(m, type(m)) for m in model.modules() if isinstance(m, FSDPModule)]
        try:
            for (module, name, _), w in zip(sliced, whole, strict=True):
                setattr(module, name, w)
            for module, cls in units:
                module.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
            yield
        finally:
            for module, cls in units:
                module.__class__ = cls
            for module, name, p in sliced:
                setattr(module, name, p)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # every rank done (rank 0 may still be writing) before gloo's threads are torn down
            dist.destroy_process_group()


def setup(device_name: str, parallel: str = "ddp") -> Dist:
    """The process group from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if parallel == "fsdp":
            raise ConfigError(
                "train.parallel is 'fsdp' but this is a single process: FSDP shards the model over the processes "
                "torchrun starts. Run `torchrun --nproc_per_node=N tools/train.py CONFIG` (N processes, e.g. one per "
                "GPU), or set train.parallel: ddp to train in one process."
            )
        return Dist(device=_single_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(world, rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"), parallel)


def sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard` (its forward passes are collectives of all processes)."""
    return isinstance(model, FSDPModule)


def shard(model: nn.Module) -> None:
    """Apply ``fully_shard`` to each of ``fsdp_units(model)``, innermost first, then to ``model``. The units that
    hold only trainable tensors are gathered whole when each forward pass starts (:func:`_gather`).

    A unit's tensors are those under it and not under a nested unit. Checked first, so that nothing is sharded when
    it fails: no unit but the root mixes trainable and frozen tensors, and no tensor is one that ``fully_shard``
    refuses (a scalar, a non-contiguous view).
    """
    units = fsdp_units(model)
    owned = _owned_parameters(model, units)
    _check_shardable(model, owned)
    for module in reversed(list(model.modules())):  # children before their parents
        if module in units and owned.get(module):
            fully_shard(module)
    fully_shard(model)
    gathered = [u for u, ps in owned.items() if u is not model and ps and all(p.requires_grad for _, p in ps)]
    model.register_forward_pre_hook(lambda module, args: _gather(gathered))
    model.register_forward_hook(lambda module, args, out: None if torch.is_grad_enabled() else _reshard(gathered))


def _check_shardable(model: nn.Module, owned: dict[nn.Module, list[tuple[str, nn.Parameter]]]) -> None:
    problems = []
    paths = {module: path for path, module in model.named_modules()}
    for unit, params in owned.items():
        if unit is not model and len({p.requires_grad for _, p in params}) > 1:
            trainable = [n for n, p in params if p.requires_grad][:2]
            frozen = [n for n, p in params if not p.requires_grad][:2]
            problems.append(
                f"the FSDP unit {paths[unit]} (vpeft.core.fsdp_units) would hold trainable {trainable} and frozen "
                f"{frozen} together"
            )
    scalars = [n for ps in owned.values() for n, p in ps if p.dim() == 0]
    if scalars:
        problems.append(f"fully_shard refuses scalar tensors: {len(scalars)}, e.g. {scalars[:3]}")
    views = [n for ps in owned.values() for n, p in ps if not p.is_contiguous()]
    if views:
        problems.append(f"fully_shard refuses non-contiguous tensors: {len(views)}, e.g. {views[:3]}")
    if problems:
        method = adapter_record(model, active_adapter(model)).method
        raise ConfigError(
            f"train.parallel: fsdp cannot shard {type(model).__name__} with method {method!r}: "
            + "; ".join(problems)
            + ". Train this method with train.parallel: ddp."
        )


def _gather(units: list[FSDPModule]) -> None:
    """All-gather ``units`` now and keep them whole until the backward pass (which reduce-scatters their gradients
    and slices them again) or :meth:`FSDPModule.reshard`. Gathering a whole unit again does nothing."""
    for unit in units:
        unit.unshard()


def _reshard(units: list[FSDPModule]) -> None:
    """Slice ``units`` again after a forward pass without gradients (evaluation), which no backward pass follows."""
    for unit in units:
        unit.reshard()


def like(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) sliced as ``live`` is, so that it can be copied into a sharded parameter."""
    if isinstance(live, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(live.device), live.device_mesh, live.placements)
    return value


def _owned_parameters(model: nn.Module, units: set[nn.Module]) -> dict[nn.Module, list[tuple[str, nn.Parameter]]]:
    """Each unit's parameters (and ``model``'s, as the root): those under it and under no nested unit."""
    owned: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}

    def visit(module: nn.Module, owner: nn.Module, prefix: str) -> None:
        owner = module if module in units else owner
        for name, p in module.named_parameters(prefix=prefix, recurse=False):
            owned.setdefault(owner, []).append((name, p))
        for name, child in module.named_children():
            visit(child, owner, f"{prefix}.{name}" if prefix else name)

    visit(model, model, "")
    return owned


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'.")
    return device
