"""GaLore (vpeft/optim/galore.py) against the package ``galore-torch``'s ``GaLoreAdamW``, step for step, and its
optimiser state measured in bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vpeft
from vpeft.optim import build_optimizer
from vpeft.optim.galore import LowRankAdamW

galore_torch = pytest.importorskip("galore_torch", reason="needs galore-torch (pip install '.[test]')")


class Blocks(nn.Module):
    """Two 'transformer blocks' of Linears (a tall, a wide and a square matrix) and a norm, under ``blocks.N``, so
    that the role ``block`` finds them; a head outside them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(12, 24), "down": nn.Linear(24, 12), "sq": nn.Linear(12, 12)})
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["sq"](block["down"](torch.relu(block["up"](x))))
        return self.head(self.norm(x))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


RANK, GAP, SCALE, LR, WD, EPS = 4, 4, 0.25, 1e-2, 0.05, 1e-6


def reference(model: Blocks, proj_type: str) -> torch.optim.Optimizer:
    """The package's optimiser with its documented set-up: the block matrices in a group with ``rank`` (GaLore), the
    rest plain; decay on every tensor so that the decoupled decay after the step is compared too."""
    projected = [m.weight for block in model.blocks for m in block.values()]
    others = [p for p in model.parameters() if all(p is not q for q in projected)]
    groups = [
        {"params": others},
        {"params": projected, "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": proj_type},
    ]
    return galore_torch.GaLoreAdamW(groups, lr=LR, weight_decay=WD, eps=EPS, no_deprecation_warning=True)


def ours(model: Blocks, proj_type: str) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for n, p in model.named_parameters() if not (n.startswith("blocks") and n.endswith("weight"))]},
        {
            "params": [p for n, p in model.named_parameters() if n.startswith("blocks") and n.endswith("weight")],
            "rank": RANK,
            "update_proj_gap": GAP,
            "scale": SCALE,
            "proj_type": proj_type,
        },
    ]
    return LowRankAdamW(groups, lr=LR, weight_decay=WD, eps=EPS)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_equals_galore_torch_over_ten_steps_with_two_subspace_refreshes(proj_type):
    data = batches(10)  # refreshes at steps 0, 4 and 8
    a, b = Blocks(), Blocks()
    losses_a = train(a, reference(a, proj_type), data)
    losses_b = train(b, ours(b, proj_type), data)
    assert losses_b == pytest.approx(losses_a, abs=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-6), name
    assert (a.blocks[0]["up"].weight - Blocks().blocks[0]["up"].weight).abs().max() > 1e-3  # it did train


def test_the_registry_builds_the_same_optimiser_from_module_patterns():
    """``vpeft.build_optimizer(model, "galore", ...)`` after ``full``: the projected tensors are the blocks' weight
    matrices (the default ``targets``, the role ``block``), and the run equals the package's with its groups made by
    hand under the registry's decay rule (none for 1-D tensors)."""
    data = batches(10)
    ours_model, theirs = Blocks(), Blocks()
    vpeft.apply_method(ours_model, "full")
    opt = vpeft.build_optimizer(
        ours_model, "galore", lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=EPS
    )
    projected = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
    assert projected == {id(m.weight) for block in ours_model.blocks for m in block.values()}
    groups = [
        {"params": [theirs.head.weight]},
        {"params": [p for p in theirs.parameters() if p.ndim == 1], "weight_decay": 0.0},
        {
            "params": [m.weight for block in theirs.blocks for m in block.values()],
            "rank": RANK,
            "update_proj_gap": GAP,
            "scale": SCALE,
            "proj_type": "std",
        },
    ]
    ref = galore_torch.GaLoreAdamW(groups, lr=LR, weight_decay=WD, eps=EPS, no_deprecation_warning=True)
    assert train(ours_model, opt, data) == pytest.approx(train(theirs, ref, data), abs=1e-6)
    for (name, p), q in zip(ours_model.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name


def state_bytes(optimizer: torch.optim.Optimizer, p: torch.Tensor, keys=("exp_avg", "exp_avg_sq")) -> int:
    return sum(optimizer.state[p][k].numel() * optimizer.state[p][k].element_size() for k in keys)


def test_state_of_a_projected_matrix_is_its_longer_side_times_the_rank():
    model = Blocks()
    opt = build_optimizer(model, "galore", lr=LR, rank=RANK, targets=("blocks",))
    train(model, opt, batches(1))
    for block in model.blocks:
        for m in block.values():
            rows, cols = m.weight.shape
            moments = state_bytes(opt, m.weight)
            assert moments == 2 * max(rows, cols) * RANK * 4  # m x r (tall) or r x n (wide), float32, two moments
            assert opt.state[m.weight]["ortho"].numel() == min(rows, cols) * RANK  # the basis: the shorter side
            assert moments < 2 * rows * cols * 4  # AdamW's two full moments
    # AdamW's state for the same matrices, measured the same way
    other = Blocks()
    adam = build_optimizer(other, "adamw", lr=LR)
    train(other, adam, batches(1))
    full = sum(state_bytes(adam, m.weight) for block in other.blocks for m in block.values())
    low = sum(state_bytes(opt, m.weight) for block in model.blocks for m in block.values())
    assert full == 2 * 4 * 2 * (12 * 24 + 24 * 12 + 12 * 12) and low == 2 * 4 * 2 * (24 * 4 + 24 * 4 + 12 * 4)
