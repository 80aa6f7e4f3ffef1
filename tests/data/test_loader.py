"""Loader order: a function of (seed, epoch) only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from vpeft.data import EpochSampler, build_loader, set_epoch


@pytest.fixture
def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(23), torch.arange(23) % 3)


def _order(loader) -> list[int]:
    return torch.cat([x for x, _ in loader]).tolist()


def test_same_seed_and_epoch_give_same_order(dataset: TensorDataset) -> None:
    first = _order(build_loader(dataset, 4, train=True, num_workers=0, seed=7, epoch=2))
    assert first == _order(build_loader(dataset, 4, train=True, num_workers=0, seed=7, epoch=2))
    assert sorted(first) == list(range(23)) and first != list(range(23))
    assert first != _order(build_loader(dataset, 4, train=True, num_workers=0, seed=7, epoch=3))
    assert first != _order(build_loader(dataset, 4, train=True, num_workers=0, seed=8, epoch=2))


def test_set_epoch_matches_a_rebuilt_loader(dataset: TensorDataset) -> None:
    loader = build_loader(dataset, 5, train=True, num_workers=0, seed=1)
    epoch0 = _order(loader)
    assert _order(loader) == epoch0  # no set_epoch: same order again
    set_epoch(loader, 4)
    assert _order(loader) == _order(build_loader(dataset, 5, train=True, num_workers=0, seed=1, epoch=4))
    rebuilt = build_loader(dataset, 5, True, 0, seed=1, epoch=4)
    assert loader.generator.initial_seed() == rebuilt.generator.initial_seed()


def test_eval_keeps_order_and_drop_last(dataset: TensorDataset) -> None:
    assert _order(build_loader(dataset, 4, train=False, num_workers=0, seed=3, epoch=5)) == list(range(23))
    loader = build_loader(dataset, 4, train=True, num_workers=0, drop_last=True)
    assert len(loader) == 5 and len(_order(loader)) == 20


def test_replicas_shard_the_same_permutation(dataset: TensorDataset) -> None:
    shards = [list(EpochSampler(dataset, seed=2, epoch=1, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 8 for s in shards)
    assert set().union(*shards) == set(range(23))
    full = list(EpochSampler(dataset, seed=2, epoch=1))
    assert shards[0] == full[0::3][:8]
    with pytest.raises(ValueError):
        EpochSampler(dataset, num_replicas=2, rank=2)


def test_workers_give_the_same_order(dataset: TensorDataset) -> None:
    single = _order(build_loader(dataset, 4, train=True, num_workers=0, seed=5))
    assert _order(build_loader(dataset, 4, train=True, num_workers=2, seed=5)) == single


class _RandomItems(torch.utils.data.Dataset):
    """Each item draws from torch's RNG, like a random augmentation does."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(1), index


def test_worker_randomness_is_reproducible_per_epoch() -> None:
    def draws(epoch: int) -> torch.Tensor:
        loader = build_loader(_RandomItems(), 2, train=True, num_workers=2, seed=9, epoch=epoch)
        return torch.cat([x for x, _ in loader])

    first = draws(1)
    assert torch.equal(first, draws(1))
    assert not torch.equal(first, draws(2))


def test_group_by_length_sorts_each_group_of_the_same_permutation() -> None:
    lengths = [int(v) for v in torch.randint(1, 400, (203,), generator=torch.Generator().manual_seed(5))]
    data = TensorDataset(torch.arange(203))
    for epoch in (0, 1):
        plain = list(EpochSampler(data, seed=3, epoch=epoch))
        grouped = list(EpochSampler(data, seed=3, epoch=epoch, lengths=lengths, group=40))
        assert sorted(grouped) == list(range(203))  # every item once
        for start in range(0, 203, 40):  # the same items per group as the plain permutation, longest first
            assert sorted(grouped[start : start + 40]) == sorted(plain[start : start + 40])
            group = [lengths[i] for i in grouped[start : start + 40]]
            assert group == sorted(group, reverse=True)
    assert list(EpochSampler(data, seed=3, lengths=lengths, group=40)) != list(
        EpochSampler(data, seed=3, epoch=1, lengths=lengths, group=40)
    )

    # padded tokens of batches of 8 (each padded to its longest item): far fewer grouped than plain
    def padded(order: list[int]) -> int:
        return sum(8 * max(lengths[i] for i in order[b : b + 8]) for b in range(0, len(order), 8))

    plain_loader = build_loader(data, 8, train=True, seed=3)
    grouped_loader = build_loader(data, 8, train=True, seed=3, lengths=lengths)
    assert padded(list(grouped_loader.sampler)) < 0.6 * padded(list(plain_loader.sampler))
    with pytest.raises(ValueError, match="lengths has 3 entries"):
        EpochSampler(data, lengths=[1, 2, 3])
