"""Training checkpoints: the trainable tensors, optimizer, schedule, AMP scaler, counters and RNG states.

Written atomically (a kill during the write leaves the previous checkpoint valid) and read with
``torch.load(weights_only=True)``, which refuses pickled code. Frozen base weights are not stored: the run rebuilds
them from its config.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.checkpoint import load_weights_only
from ..core import active_adapter, adapter_tensors, load_adapter_tensors
from ..errors import MissingFileError
from ..files import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    counters: dict[str, Any],
) -> None:
    name = active_adapter(model)
    state = {
        "trainable": {k: v.detach().cpu().clone() for k, v in adapter_tensors(model, name).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "counters": counters,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the counters (epoch, step, best metric...)."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: the run has no checkpoint to resume from.")
    state = load_weights_only(path)
    load_adapter_tensors(model, active_adapter(model), state["trainable"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(_as_tuples(state["rng"]["python"]))
    return state["counters"]


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
