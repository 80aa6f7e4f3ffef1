"""DynMoLE against direct computations: the normalised Tsallis entropy and the hybrid routing of hand-made router
distributions, the auxiliary loss (entropy term and load balance) by hand, the layer output token by token, and the
loss of a real forward pass recomputed from the layers' inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import adapted_modules, layers_of
from vpeft.errors import UserError
from vpeft.methods.dynmole import DynMoLEConfig, auxiliary_loss, hybrid_routing, tsallis_entropy

from ..lm.models import tiny_llama
from ._two_layers import TwoLayers

Q, EPS = 1.1, 1e-5
# hand-made router distributions over 4 experts, and where each goes at top_p 0.75, keep_top_k 2, threshold 0.95:
ROWS = [
    [0.50, 0.30, 0.15, 0.05],  # top-p keeps 0.50 (0.80 > 0.75); keep_top_k adds 0.30: experts 0, 1
    [0.60, 0.10, 0.05, 0.25],  # top-p keeps 0.60; keep_top_k adds the second largest, 0.25: experts 0, 3
    [0.26, 0.25, 0.25, 0.24],  # nearly uniform: its normalised entropy is above 0.95, it goes to every expert
]
ROUTED = [[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]]


def tsallis(p: list[float], q: float = Q, eps: float = EPS) -> float:
    """``(1 - sum (p_i + eps)^q) / (q - 1)`` over its value at the uniform distribution, ``(1 - E^{1-q}) / (q - 1)``."""
    s = (1 - sum((pi + eps) ** q for pi in p)) / (q - 1)
    return s / ((1 - len(p) ** (1 - q)) / (q - 1))


def test_normalised_tsallis_entropy_of_hand_made_distributions():
    probs = torch.tensor(ROWS + [[0.7, 0.2, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got = tsallis_entropy(probs, Q, EPS)
    torch.testing.assert_close(got, torch.tensor([tsallis(r) for r in probs.tolist()], dtype=torch.float64))
    assert got[2] > 0.95 > got[0] and got[4] < 1e-3  # near uniform ~1, one-hot ~0
    uniform = tsallis_entropy(torch.full((1, 4), 0.25, dtype=torch.float64), Q, 0.0)
    torch.testing.assert_close(uniform, torch.ones(1, dtype=torch.float64))
    # q = 1 is Shannon's entropy over log E, the limit of the Tsallis entropy as q -> 1
    shannon = [-sum((x + EPS) * math.log(x + EPS) for x in r) / math.log(4) for r in probs.tolist()]
    torch.testing.assert_close(tsallis_entropy(probs, 1.0, EPS), torch.tensor(shannon, dtype=torch.float64))
    rows = torch.tensor(ROWS, dtype=torch.float64)  # without eps (which makes p sum above 1) q -> 1 tends to it
    torch.testing.assert_close(tsallis_entropy(rows, 1 + 1e-6, 0.0), tsallis_entropy(rows, 1.0, 0.0), atol=1e-5, rtol=0)


def test_hybrid_routing_of_hand_made_distributions():
    mask = hybrid_routing(torch.tensor(ROWS), top_p=0.75, keep_top_k=2, q=Q, threshold=0.95, eps=EPS)
    assert mask.int().tolist() == ROUTED
    row = torch.tensor([[0.5, 0.2, 0.18, 0.12]])
    wider = hybrid_routing(row, top_p=0.9, keep_top_k=1, q=Q, threshold=0.95, eps=EPS)
    assert wider.int().tolist() == [[1, 1, 1, 0]]  # cumulative 0.5, 0.7, 0.88 <= 0.9 < 1.0
    never = hybrid_routing(torch.tensor(ROWS), top_p=0.75, keep_top_k=2, q=Q, threshold=1.0, eps=EPS)
    assert never.int().tolist()[2] == [1, 1, 0, 0]  # threshold 1: no broadcast, the near-uniform row takes its top 2


def test_auxiliary_loss_by_hand():
    probs = torch.tensor(ROWS, dtype=torch.float64)
    gates = probs * torch.tensor(ROUTED, dtype=torch.float64)
    config = DynMoLEConfig()  # entropy_weight 0.01, balance 0.001
    e, n = 4, len(ROWS)
    f = [sum(ROWS[t][i] * ROUTED[t][i] for t in range(n)) / n for i in range(e)]  # mean routed weight of expert i
    p = [sum(ROWS[t][i] for t in range(n)) / n for i in range(e)]  # mean probability of expert i
    balance = e * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    entropy = sum(tsallis(r) for r in ROWS) / n
    assert auxiliary_loss(probs, gates, config).item() == pytest.approx(0.01 * entropy + 0.001 * balance, rel=1e-9)


def route(p: list[float], top_p: float, keep: int, threshold: float) -> list[int]:
    """The experts a token goes to, decided in Python: all when the normalised entropy is above ``threshold``, else
    the most probable while their running sum stays within ``top_p``, and at least ``keep`` of them."""
    if tsallis(p) > threshold:
        return list(range(len(p)))
    order, chosen, total = sorted(range(len(p)), key=lambda i: -p[i]), [], 0.0
    for i in order:
        total += p[i]
        if total <= top_p or len(chosen) < keep:
            chosen.append(i)
    return chosen


def softmax(router: torch.Tensor, token: torch.Tensor) -> list[float]:
    scores = [math.exp(float(w @ token)) for w in router]
    return [s / sum(scores) for s in scores]


def test_output_is_the_routed_mixture_token_by_token():
    torch.manual_seed(0)
    base = TwoLayers()
    model = copy.deepcopy(base)
    options = dict(targets=("fc1", "fc2"), r=2, alpha=4.0, dropout=0.0, experts=4, entropy_threshold=0.97, head=())
    vpeft.apply_method(model, "dynmole", **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    fc1, fc2 = layers_of(model, "default")
    with torch.no_grad():  # routers of mixed confidence: some tokens go to every expert, others to their top-p
        fc1.router.mul_(0.3), fc2.router.mul_(0.3)
    routed = []

    def layer(linear: nn.Linear, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = linear(h).detach()
        for t, token in enumerate(h.detach()):
            p = softmax(m.router.detach(), token)
            experts = route(p, 0.75, 2, 0.97)
            routed.append(len(experts))
            for i in experts:  # weighted by p_i as it is, not renormalised
                out[t] += p[i] * 2.0 * (m.lora_B[:, i].detach() @ (m.lora_A[i].detach() @ token))
        return out

    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    expected = layer(base.fc2, fc2, torch.tanh(layer(base.fc1, fc1, x)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert {2, 4} <= set(routed), routed  # both kinds of routing occur: top-p (with keep_top_k) and every expert


def test_loss_of_a_training_pass_recomputed_from_the_layer_inputs():
    model = tiny_llama()
    vpeft.apply_method(model, "dynmole", dropout=0.0, entropy_threshold=0.97)
    seen = {}
    for adapted in adapted_modules(model, "default"):
        hook = lambda _, args, path=adapted.path: seen.__setitem__(path, args[0].detach())  # noqa: E731
        adapted.base.register_forward_pre_hook(hook)
    model.train()
    model(input_ids=torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(0)))
    loss = vpeft.method_loss(model)

    routers = {a.path: a.parts["all"].router.detach() for a in adapted_modules(model, "default")}
    probs, gates = [], []
    for path, x in seen.items():  # every token of every adapted layer, together
        for token in x.reshape(-1, x.shape[-1]):
            p = softmax(routers[path], token)
            experts = route(p, 0.75, 2, 0.97)
            probs.append(p)
            gates.append([p[i] if i in experts else 0.0 for i in range(6)])
    n = len(probs)
    f = [sum(row[i] for row in gates) / n for i in range(6)]
    mean_p = [sum(row[i] for row in probs) / n for i in range(6)]
    entropy = sum(tsallis(p) for p in probs) / n
    expected = 0.01 * entropy + 0.001 * 6 * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert loss.requires_grad
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert vpeft.method_loss(model) is None  # taken; evaluation passes keep nothing
    model.eval()
    model(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert vpeft.method_loss(model) is None


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"experts": 1}, "at least 2 experts"),
        ({"keep_top_k": 7}, "keep_top_k=7 exceeds experts=6"),
        ({"entropy_index": 2.5}, "must be in"),
    ],
)
def test_options_out_of_range_are_refused(options, phrase):
    with pytest.raises(UserError, match=phrase):
        vpeft.apply_method(tiny_llama(), "dynmole", **options)
