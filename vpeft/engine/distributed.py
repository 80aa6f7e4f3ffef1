"""Data-parallel training under ``torchrun``: process group, device, and the few collective operations the loop uses.

``torchrun --nproc_per_node=N tools/train.py CONFIG`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; the loop
then wraps the model in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU) with ``find_unused_parameters=False``:
frozen tensors are not parameters DDP waits for, and every trainable tensor is used in each step (the first-step
gradient check enforces it). ``data.batch_size`` is per process. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")

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
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_name: str) -> Dist:
    """The process group from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=_single_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(world, rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'.")
    return device
