"""MoLA against direct computations: the top-k mixture of hand-built LoRA experts token by token, the expert counts per
block from the depth pattern, the parameter count by hand, and the load-balancing loss recomputed from the layers'
inputs; how the routing statistics reach the loss (training passes only, the latest one, taken once)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import adapted_modules, adapter_record, layers_of
from vpeft.errors import UserError
from vpeft.methods.mola import MoLAConfig

from ..lm.models import tiny_llama
from ._two_layers import TwoLayers

R, ALPHA = 2, 6.0


def randomise(model: nn.Module, seed: int = 1, scale: float = 1.0) -> None:
    """Every expert, B included, and every router away from its initial value (small enough on a deep model that
    no router saturates: in float32 a saturated softmax ties its tiny probabilities at 0, and top-k picks among them
    at will)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def mixture(x: torch.Tensor, router: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_{i in top-k} (p_i / sum_top p) (alpha / r) B_i A_i x`` token by token, the choice made in Python."""
    rows = []
    for token in x:
        scores = [math.exp(float(router[i] @ token.detach())) for i in range(router.shape[0])]
        p = [s / sum(scores) for s in scores]
        top = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        update = torch.zeros(b.shape[0])
        for i in top:
            update += p[i] / sum(p[j] for j in top) * (ALPHA / R) * (b[:, i] @ (a[i] @ token))
        rows.append(update)
    return torch.stack(rows)


def test_output_is_the_top_k_mixture_of_hand_built_experts():
    torch.manual_seed(0)
    base = TwoLayers()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "mola", targets=("fc1", "fc2"), r=R, alpha=ALPHA, dropout=0.0, experts=(4,), head=())
    randomise(model)
    fc1, fc2 = layers_of(model, "default")
    assert fc1.lora_A.shape == (4, R, 6) and fc2.lora_B.shape == (4, 4, R)  # 4 experts of rank R each

    def layer(linear: nn.Linear, m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return linear(h) + mixture(h, m.router.detach(), m.lora_A.detach(), m.lora_B.detach(), 2)

    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    expected = layer(base.fc2, fc2, torch.tanh(layer(base.fc1, fc1, x)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), base(x))
        one = fc1.expert_update(x, 3)  # expert 3 alone is the LoRA it holds
        torch.testing.assert_close(one, (ALPHA / R) * x @ (fc1.lora_B[:, 3] @ fc1.lora_A[3]).T, rtol=1e-5, atol=1e-5)


def experts_per_block(model: nn.Module) -> dict[int, set[int]]:
    counts: dict[int, set[int]] = {}
    for adapted in adapted_modules(model, "default"):
        block = int(adapted.path.split(".")[2])  # model.layers.<i>.
        counts.setdefault(block, set()).update(m.experts for m in adapted.parts.values())
    return counts


@pytest.mark.parametrize(
    ("experts", "per_block"),
    [
        ("inverted_triangle", [2, 4, 6, 8]),  # the default, MoLA-▽
        ("triangle", [8, 6, 4, 2]),
        ("hourglass", [8, 2, 2, 8]),
        ("rectangle", [5, 5, 5, 5]),
        ((3, 7), [3, 3, 7, 7]),  # two depth groups of two blocks
    ],
)
def test_expert_counts_follow_the_depth_pattern(experts, per_block, tmp_path):
    model = tiny_llama(4)
    vpeft.apply_method(model, "mola", experts=experts)
    assert adapter_record(model).config.num_layers == 4  # counted from the model, kept for rebuilding
    assert experts_per_block(model) == {i: {n} for i, n in enumerate(per_block)}
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(4)
    vpeft.load_adapter(fresh, tmp_path / "a")
    assert experts_per_block(fresh) == experts_per_block(model)


def test_depth_groups_of_a_block_count_the_pattern_does_not_divide():
    config = MoLAConfig(num_layers=6)  # 2, 4, 6, 8 over 6 blocks: block l is in group floor(4 l / 6)
    assert [config.experts_at(i) for i in range(6)] == [2, 2, 4, 6, 6, 8]


def test_parameter_count_by_hand():
    """Llama, width 32, MLP 64, grouped k/v 16 wide, r = 8: per block and expert q (32 -> 32) 8 * 64 + 32 = 544,
    k and v (32 -> 16) 8 * 48 + 32 = 416 each, o 544, up (32 -> 64) 8 * 96 + 32 = 800, down (64 -> 32) 8 * 96 + 64 =
    832: 3,552; times 2 + 4 + 6 + 8 = 20 experts over the four blocks."""
    model = tiny_llama(4)
    report = vpeft.apply_method(model, "mola")
    assert report.trainable == 3552 * 20 == 71040


def test_top_k_above_the_fewest_experts_is_refused():
    with pytest.raises(UserError, match="top_k=3 exceeds the fewest experts of a block, 2"):
        vpeft.apply_method(tiny_llama(2), "mola", top_k=3)


def inputs_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """The input of every adapted layer in the next forward pass, by module path (hooks on the base layers)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for adapted in adapted_modules(model, "default"):
        hook = lambda _, args, path=adapted.path: seen.__setitem__(path, args[0].detach())  # noqa: E731
        hooks.append(adapted.base.register_forward_pre_hook(hook))
    return seen, hooks


def test_balance_loss_is_switch_s_per_block_over_its_targets():
    model = tiny_llama(4)
    vpeft.apply_method(model, "mola", balance=0.001, dropout=0.0)
    randomise(model, scale=0.2)
    seen, hooks = inputs_of(model)
    model.train()
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    loss = vpeft.method_loss(model)

    expected = 0.0
    routers = {a.path: a.parts["all"].router.detach() for a in adapted_modules(model, "default")}
    for block in range(4):
        probs, picks = [], []
        for path, x in seen.items():
            if path.split(".")[2] != str(block):
                continue
            for token in x.reshape(-1, x.shape[-1]):
                scores = [math.exp(float(w @ token)) for w in routers[path]]
                p = [s / sum(scores) for s in scores]
                top = sorted(range(len(p)), key=lambda i: -p[i])[:2]
                probs.append(p)
                picks.append([1.0 if i in top else 0.0 for i in range(len(p))])
        e, n = len(probs[0]), len(probs)
        f = [sum(row[i] for row in picks) / (2 * n) for i in range(e)]  # share of the block's 2n assignments
        mean_p = [sum(row[i] for row in probs) / n for i in range(e)]
        expected += e * sum(fi * pi for fi, pi in zip(f, mean_p, strict=True))
    assert loss.requires_grad  # the router learns from it
    assert loss.item() == pytest.approx(0.001 * expected, rel=1e-5)


def test_routing_reaches_the_loss_from_the_latest_training_pass_only():
    model = tiny_llama(2)
    vpeft.apply_method(model, "mola", balance=0.001)
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)  # evaluation mode: nothing kept
    assert vpeft.method_loss(model) is None
    model.train()
    model(input_ids=ids[:1])
    model(input_ids=ids)  # the second pass replaces the first
    copy.deepcopy(model)  # a model holding a pass's routing copies (empty-handed)
    first = vpeft.method_loss(model)
    assert vpeft.method_loss(model) is None  # taken
    model(input_ids=ids)
    torch.testing.assert_close(vpeft.method_loss(model), first)


def test_no_balance_no_loss():
    model = tiny_llama(2)
    vpeft.apply_method(model, "mola")  # the official default: the balance loss is off
    model.train()
    model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert vpeft.method_loss(model) is None
