"""Non-IID client splits: for each class, the share of its items that each client gets is drawn from a symmetric
Dirichlet(beta) (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019, arXiv:1909.06335). Small beta gives each client few classes; large beta tends to IID."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError


def dirichlet_split(labels: Sequence[int], clients: int, beta: float, seed: int = 0) -> list[list[int]]:
    """Item indices per client. Each class's items are shuffled and cut at the cumulative Dirichlet(beta) shares;
    every item goes to exactly one client. A client left with no item takes one from the largest client, so every
    client can train."""
    if clients < 1:
        raise ConfigError(f"the number of clients must be at least 1, got {clients}.")
    if not beta > 0:
        raise ConfigError(f"the Dirichlet concentration beta must be > 0, got {beta} (0.1: very skewed, 100: ~IID).")
    if len(labels) < clients:
        raise ConfigError(f"{len(labels)} items cannot be split among {clients} clients; use fewer clients.")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for cls in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(clients, beta))
        cuts = (np.cumsum(shares)[:-1] * len(items)).round().astype(int)
        for k, chunk in enumerate(np.split(items, cuts)):
            parts[k].extend(int(i) for i in chunk)
    for k in range(clients):
        if not parts[k]:
            donor = max(range(clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[donor].pop())
    return [sorted(p) for p in parts]
