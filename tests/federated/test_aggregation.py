"""Server aggregation against independent computations on a tiny BERT trained by 4 clients on a non-IID (Dirichlet
over labels) split: the served update of each rule is read back from the *merged* model weights (vpeft.merge, the
dense ``W0 + s B A``), not from the factors. FedAvg of LoRA is biased, LoRA-FAIR's correction lowers the residual
``||mean_k s B_k A_k - s B' A'||`` below FedAvg's, FFA-LoRA's averaging is exact; the Dirichlet split is a partition."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import vpeft
from vpeft.core import adapter_tensors, load_adapter_tensors
from vpeft.errors import ConfigError
from vpeft.federated import client_weights, dirichlet_split, fedavg, ffa_lora, lora_fair, lora_pairs, residual

from ..lm.models import VOCAB, task_loss, tiny_bert

R, ALPHA, CLIENTS = 4, 8.0, 4
SCALE = ALPHA / R


def data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose class is carried by their first token (so clients with different classes learn
    different updates)."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, 8), generator=g)
    ids[:, 0] = 1 + labels
    return ids, labels


def trained_clients(method: str, beta: float = 0.3) -> tuple[torch.nn.Module, torch.nn.Module, list[dict], list[float]]:
    """(base model, adapted model, client states, FedAvg weights): each client trains 6 AdamW steps from the same
    initial adapter on its share."""
    base = tiny_bert()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, targets=("query", "value"), r=R, alpha=ALPHA, dropout=0.0, head=())
    init = {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}
    ids, labels = data()
    shares = dirichlet_split(labels.tolist(), CLIENTS, beta, seed=0)
    states = []
    for share in shares:
        load_adapter_tensors(model, "default", init, "init")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        index = torch.tensor(share)
        for step in range(6):
            pick = index[torch.arange(step * 8, step * 8 + 8) % len(index)]
            batch = {"input_ids": ids[pick], "attention_mask": torch.ones_like(ids[pick]), "labels": labels[pick]}
            opt.zero_grad()
            task_loss(model, batch)[0].backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()})
    return base, model, states, client_weights([len(s) for s in shares])


def dense(model: torch.nn.Module, state: dict) -> dict[str, torch.Tensor]:
    """The query/value weights of ``model`` with ``state`` loaded and merged (float64)."""
    m = copy.deepcopy(model)
    load_adapter_tensors(m, "default", state, "test")
    vpeft.merge(m)
    return {k: v.double() for k, v in m.state_dict().items() if ("query" in k or "value" in k) and k.endswith("weight")}


def dense_residual(model, states, weights, served) -> float:
    """``sqrt(sum ||mean_k W_k - W'||^2) / s`` from merged weights: the served update's distance to the average."""
    per_client = [dense(model, s) for s in states]
    got = dense(model, served)
    total = sum(
        float((sum(w * d[k] for d, w in zip(per_client, weights, strict=True)) - got[k]).pow(2).sum()) for k in got
    )
    return total**0.5 / SCALE


@pytest.fixture(scope="module")
def lora_clients():
    return trained_clients("lora")


def test_the_split_is_non_iid(lora_clients):
    _, labels = data()
    shares = dirichlet_split(labels.tolist(), CLIENTS, 0.3, seed=0)
    mixes = [Counter(labels[s].tolist()) for s in shares]
    shares_of_major = [max(m.values()) / sum(m.values()) for m in mixes]
    assert max(shares_of_major) > 0.6  # some client is dominated by one class (the whole set is ~1/3 each)


def test_lora_fair_residual_is_below_fedavg_and_both_match_the_merged_weights(lora_clients):
    _, model, states, weights = lora_clients
    naive, fair = fedavg(states, weights), lora_fair(states, weights)
    r_naive, r_fair = residual(states, weights, naive), residual(states, weights, fair)
    assert r_naive > 1e-3  # FedAvg of A and B is biased on this non-IID split
    assert r_fair < 0.95 * r_naive
    assert r_naive == pytest.approx(dense_residual(model, states, weights, naive), rel=1e-3)
    assert r_fair == pytest.approx(dense_residual(model, states, weights, fair), rel=1e-3)
    for key in naive:  # LoRA-FAIR changes only B
        if not key.endswith("lora_B"):
            assert torch.equal(fair[key], naive[key])


def test_lora_fair_correction_is_the_ridge_minimiser(lora_clients):
    """At Delta B the gradient of ||M - (B + dB) A||^2 + lam' ||dB||^2 vanishes; a perturbed dB scores worse."""
    _, _, states, weights = lora_clients
    naive, fair = fedavg(states, weights), lora_fair(states, weights, lam=0.05)
    prefix = lora_pairs(naive)[0]
    a, b = naive[f"{prefix}.lora_A"].double(), naive[f"{prefix}.lora_B"].double()
    target = sum(
        w * s[f"{prefix}.lora_B"].double() @ s[f"{prefix}.lora_A"].double()
        for s, w in zip(states, weights, strict=True)
    )
    lam = 0.05 * float((a @ a.T).trace()) / a.shape[0]

    def objective(db):
        return float((target - (b + db) @ a).pow(2).sum() + lam * db.pow(2).sum())

    db = fair[f"{prefix}.lora_B"].double() - b
    grad = -2 * (target - (b + db) @ a) @ a.T + 2 * lam * db
    assert grad.abs().max() < 1e-4 * (target.abs().max() * a.abs().max() + 1e-12) * 10
    noise = 1e-3 * torch.randn(db.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert objective(db) < objective(db + noise) and objective(db) < objective(torch.zeros_like(db))


def test_ffa_lora_averaging_is_exact():
    _, model, states, weights = trained_clients("ffa_lora")
    served = ffa_lora(states, weights)
    assert residual(states, weights, served) < 1e-6
    assert dense_residual(model, states, weights, served) < 1e-4  # float32 merges


def test_ffa_rule_refuses_clients_whose_a_differs(lora_clients):
    _, _, states, weights = lora_clients
    with pytest.raises(ConfigError, match="differs from client 0"):
        ffa_lora(states, weights)


@pytest.mark.parametrize("beta", [0.1, 1.0, 100.0])
def test_dirichlet_split_is_a_partition_and_repeats_by_seed(beta):
    labels = [i % 5 for i in range(200)]
    parts = dirichlet_split(labels, 6, beta, seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(200)) and all(parts)
    assert parts == dirichlet_split(labels, 6, beta, seed=3)


def test_split_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="beta"):
        dirichlet_split([0, 1], 2, 0.0)
    with pytest.raises(ConfigError, match="fewer clients"):
        dirichlet_split([0, 1], 3, 1.0)
