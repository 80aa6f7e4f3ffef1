"""Data loaders with a reproducible order: the shuffle is a function of ``(seed, epoch)`` only.

:class:`EpochSampler` works like ``torch.utils.data.DistributedSampler``: it permutes the indices with a
``torch.Generator`` seeded from ``(seed, epoch)`` and can split them across ``num_replicas`` processes (``rank``).
:func:`build_loader` wraps it in a ``DataLoader``. Between epochs the caller either rebuilds the loader with the
new ``epoch`` or calls :func:`set_epoch` (``loader.sampler.set_epoch`` plus a re-seed of the loader's generator, which
fixes the workers' base seeds). A run resumed at epoch ``e`` thus sees exactly the order a continuous run sees at
epoch ``e``. Worker processes seed ``random`` and ``numpy`` from their torch seed (:func:`seed_worker`); with
``num_workers > 0`` random augmentations are then reproducible too. ``persistent_workers`` stays off.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


class EpochSampler(Sampler[int]):
    """Index sampler whose order depends only on ``(seed, epoch)``; optionally one shard of ``num_replicas``.

    Without ``drop_last``, the index list is padded by repeating its start so every replica gets the same number of
    items (as ``DistributedSampler`` does); with it, the tail is dropped. With one replica nothing is padded.

    Args:
        data_source: The dataset (only its length is used).
        shuffle: Permute the indices (training) or keep them in order (evaluation).
        seed: Base seed of the permutation.
        epoch: Current epoch; change it with :meth:`set_epoch`.
        num_replicas: Number of processes sharing the data (DDP world size).
        rank: This process's index in ``[0, num_replicas)``.
        drop_last: Drop the tail instead of padding when the length does not divide by ``num_replicas``.
        lengths: Each item's length (tokens). With ``shuffle`` the permutation is cut into groups of ``group`` items
            and each group is ordered longest first, so a batch holds items of similar length and pads little (the
            ``transformers`` Trainer's ``group_by_length``); the order still depends only on ``(seed, epoch)``.
        group: Items per length-sorted group (:func:`build_loader`: 50 global batches).
    """

    def __init__(
        self,
        data_source: Sized,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        group: int = 1,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
        self.length = len(data_source)
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        if lengths is not None and len(lengths) != self.length:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {self.length} items")
        self.lengths, self.group = lengths, max(1, group)
        if drop_last:
            self.num_samples = self.length // num_replicas
        else:
            self.num_samples = math.ceil(self.length / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next permutation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            indices = torch.randperm(self.length, generator=generator).tolist()
            if self.lengths is not None:
                span, lengths = self.group, self.lengths
                cuts = range(0, len(indices), span)
                indices = [i for c in cuts for i in sorted(indices[c : c + span], key=lambda i: -lengths[i])]
        else:
            indices = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total > len(indices) and indices:
            indices += (indices * math.ceil(total / len(indices)))[: total - len(indices)]
        indices = indices[:total]
        return iter(indices[self.rank : total : self.num_replicas])


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's ``random`` and ``numpy`` from the worker's torch seed, and a dataset whose
    transforms draw from a generator of their own (albumentations) through its ``reseed(seed)``: forked workers
    would otherwise all continue one copied generator and augment alike."""
    del worker_id
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    reseed = getattr(torch.utils.data.get_worker_info().dataset, "reseed", None)
    if reseed is not None:
        reseed(worker_seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
    lengths: Sequence[int] | None = None,
) -> DataLoader:
    """Build a ``DataLoader`` over an :class:`EpochSampler`: shuffled by ``(seed, epoch)`` when ``train``.

    Args:
        dataset: A map-style dataset.
        batch_size: Items per batch.
        train: Shuffle (training) or keep the dataset order (evaluation).
        num_workers: Worker processes; 0 loads in the main process.
        seed: Base seed of the shuffle and of the workers' seeds.
        epoch: Epoch of the first iteration; advance it with :func:`set_epoch` or rebuild the loader.
        drop_last: Drop the last incomplete batch.
        num_replicas: DDP world size (the sampler yields this rank's shard).
        rank: DDP rank.
        pin_memory: Passed to ``DataLoader``.
        collate_fn: Passed to ``DataLoader`` (``None``: torch's default collate).
        lengths: Items' lengths: training batches are grouped by length (see :class:`EpochSampler`), 50 global
            batches at a time.

    Returns:
        The loader; ``loader.sampler`` is the :class:`EpochSampler`.
    """
    sampler = EpochSampler(
        dataset, train, seed, epoch, num_replicas, rank, lengths=lengths, group=50 * batch_size * num_replicas
    )
    generator = torch.Generator().manual_seed(_epoch_seed(seed + 1, epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=False,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Move a loader from :func:`build_loader` to ``epoch``: new shuffle order and new worker seeds.

    Equivalent to rebuilding the loader with ``epoch=epoch``.
    """
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError("set_epoch needs a loader made by build_loader (its sampler is an EpochSampler)")
    sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(_epoch_seed(sampler.seed + 1, epoch))
