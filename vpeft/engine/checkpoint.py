"""Training checkpoints: the trainable tensors, optimizer, schedule, AMP scaler, counters and RNG states.

Written atomically (a kill during the write leaves the previous checkpoint valid) and read with
``torch.load(weights_only=True)``, which refuses pickled code. Frozen base weights are not stored: the run rebuilds
them from its config. Tensors are stored whole, also from an FSDP run (its slices are gathered, and sliced again on
load), and the optimizer state is keyed by parameter name (torch's ``get_optimizer_state_dict``), so a checkpoint
does not depend on how many processes wrote it or how they split the model.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..backbones.checkpoint import load_weights_only
from ..core import (
    active_adapter,
    adapter_record,
    adapter_tensors,
    config_to_dict,
    load_adapter_tensors,
    rebuild_adapter,
)
from ..errors import ConfigError, MissingFileError
from ..files import atomic_write
from .distributed import like

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    counters: dict[str, Any],
    write: bool = True,
) -> None:
    """Under FSDP every process calls this (the slices are gathered); only the one with ``write`` writes."""
    name = active_adapter(model)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "trainable": {k: _whole(v).detach().cpu().clone() for k, v in adapter_tensors(model, name).items()},
        # the adapter's structure now: a controller may have changed its shapes (per-target ranks) since it was built
        "adapter_config": config_to_dict(adapter_record(model, name).config),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=whole),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "counters": counters,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
    }
    if write:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the counters (epoch, step, best metric...)."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: the run has no checkpoint to resume from.")
    state = load_weights_only(path)
    name = active_adapter(model)
    live = adapter_tensors(model, name)
    trainable = {k: like(v, live[k]) if k in live else v for k, v in state["trainable"].items()}
    load_adapter_tensors(model, name, trainable, str(path))
    _load_optimizer(path, model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(_as_tuples(state["rng"]["python"]))
    return state["counters"]


def restore_structure(path: Path, model: nn.Module) -> bool:
    """Rebuild the model's adapter at the shapes its config had when ``path`` was written (a controller pruned or
    grew it), before the optimiser is built and :func:`load_checkpoint` fills it; whether it was rebuilt."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: the run has no checkpoint to resume from.")
    saved = load_weights_only(path).get("adapter_config")
    return saved is not None and rebuild_adapter(model, saved)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The state keyed by parameter name; a checkpoint of an earlier vpeft keyed it by position (plain
    ``optimizer.state_dict()``), which is still read for a model that is not sharded."""
    keys = [key for group in saved["param_groups"] for key in group["params"]]
    if not keys or isinstance(keys[0], str):
        # not strict: a trainable tensor that never took a step (a controller's gate that learns outside the
        # optimiser, a frozen block) has no state to restore; every state that was saved must be restored
        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        # torch fills the state of such a tensor by a step of zero gradient (AdamW: step 1, zero moments), which the
        # run without the interruption never took: drop it, so that the tensor's first step is as it would have been
        for n, p in model.named_parameters():
            if p in optimizer.state and n not in saved["state"]:
                del optimizer.state[p]
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError(
            f"{path} was written by an earlier vpeft, whose optimizer state follows one process's parameter order; "
            "it cannot be resumed sharded (train.parallel: fsdp). Resume it with train.parallel: ddp."
        )
    optimizer.load_state_dict(saved)
