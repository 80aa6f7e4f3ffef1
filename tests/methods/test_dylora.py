"""DyLoRA against direct computations: at rank b the output is a LoRA built by hand from ``A[:b]``, ``B[:, :b]`` and
the scale ``alpha / b``; frozen training reaches only row/column b; the ranks are uniform on 1..r, one per step for
every target; the evaluation rank merges, saves and exports (as a LoRA that HF PEFT loads).

``python -m tests.methods.test_dylora`` prints the every-rank table of the method's docstring."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import adapter_record, layers_of
from vpeft.errors import UserError
from vpeft.methods.dylora import DyLoRA, DyLoRAConfig, draw_rank, set_eval_rank

from ..lm.models import VOCAB, batches, task_loss, tiny_llama
from ._two_layers import TwoLayers

R, ALPHA = 4, 6.0


def adapted(**options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = TwoLayers()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dylora", targets=("fc1", "fc2"), r=R, alpha=ALPHA, dropout=0.0, head=(), **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B away from zero, where every rank is the identity
        for layer in layers_of(model, "default"):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return base, model


def by_hand(base: nn.Module, model: nn.Module, x: torch.Tensor, b: int) -> torch.Tensor:
    """The two layers with a rank-b LoRA ``(alpha / b) B[:, :b] A[:b]`` on each, from the raw tensors."""
    (l1, l2) = layers_of(model, "default")

    def layer(linear: nn.Linear, m: DyLoRA, h: torch.Tensor) -> torch.Tensor:
        weight = linear.weight + (ALPHA / b) * m.lora_B.detach()[:, :b] @ m.lora_A.detach()[:b]
        return F.linear(h, weight, linear.bias)

    return layer(base.fc2, l2, torch.tanh(layer(base.fc1, l1, x)))


@pytest.mark.parametrize("b", range(1, R + 1))
def test_at_rank_b_the_output_is_the_lora_of_the_first_b_components(b):
    base, model = adapted()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    set_eval_rank(model, b)
    model.eval()
    torch.testing.assert_close(model(x), by_hand(base, model, x, b), rtol=1e-6, atol=1e-6)
    model.train()
    for layer in layers_of(model, "default"):
        layer.train_rank = b
    torch.testing.assert_close(model(x), by_hand(base, model, x, b), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(model(x), base(x))


@pytest.mark.parametrize("frozen", [True, False])
def test_a_step_at_rank_b_trains_row_b_only_when_frozen(frozen):
    _, model = adapted(frozen=frozen)
    model.train()
    b = 3
    for layer in layers_of(model, "default"):
        layer.train_rank = b
    model(torch.randn(7, 6)).square().sum().backward()
    for layer in layers_of(model, "default"):
        rows_a = layer.lora_A.grad.abs().sum(1) > 0  # (r,)
        cols_b = layer.lora_B.grad.abs().sum(0) > 0
        trained = [b] if frozen else list(range(1, b + 1))
        expected = torch.tensor([i + 1 in trained for i in range(R)])
        assert torch.equal(rows_a, expected) and torch.equal(cols_b, expected)


def test_ranks_are_uniform_on_1_to_r_one_per_step_for_all_targets_and_reproducible():
    _, model = adapted(seed=5)
    layers = layers_of(model, "default")
    config = adapter_record(model).config
    state = torch.random.get_rng_state()
    drawn = []
    for step in range(4000):
        vpeft.on_step(model, step, 4000)
        ranks = {layer.train_rank for layer in layers}
        assert len(ranks) == 1
        drawn.append(ranks.pop())
    assert torch.equal(torch.random.get_rng_state(), state)  # torch's generator is not touched
    assert drawn == [draw_rank(config, s + 1) for s in range(4000)]
    counts = Counter(drawn)
    assert set(counts) == set(range(1, R + 1))
    # each count is Binomial(4000, 1/4): mean 1000, sd 27.4; 5 sd either side
    assert all(abs(c - 1000) < 137 for c in counts.values()), counts
    assert [draw_rank(DyLoRAConfig(r=R, seed=6), s) for s in range(50)] != drawn[:50]


def test_merge_is_exact_at_the_evaluation_rank_and_the_rank_is_saved(tmp_path):
    base, model = adapted(eval_rank=2)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(4))
    model.eval()
    expected = by_hand(base, model, x, 2)
    vpeft.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    vpeft.unmerge(model)
    set_eval_rank(model, 3)
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    assert adapter_record(fresh).config.eval_rank == 3
    torch.testing.assert_close(fresh(x), by_hand(base, model, x, 3), rtol=1e-6, atol=1e-6)


def test_bad_ranks_are_refused():
    with pytest.raises(UserError, match="eval_rank=5 exceeds r=4"):
        adapted(eval_rank=5)
    with pytest.raises(UserError, match="eval_rank must be"):
        adapted(eval_rank=0)
    _, model = adapted()
    with pytest.raises(UserError, match="outside 1 to r=4"):
        set_eval_rank(model, 5)


def test_vit_b16_count_is_lora_s(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "dylora")
    assert report.trainable == 2 * 12 * 8 * (768 + 768) == 294_912


def adapted_llama() -> tuple[nn.Module, nn.Module]:
    base = tiny_llama()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dylora", dropout=0.0, head=())
    return base, model


def counting(count: int, seed: int, batch: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up from a random token (mod the vocabulary): a next-token task with something to learn,
    unlike the contract tests' random tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = (torch.randint(0, VOCAB - 1, (batch, 1), generator=g) + torch.arange(length)) % (VOCAB - 1) + 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def train(model: nn.Module, steps: int) -> nn.Module:
    """AdamW (lr 3e-2) on the counting task, with the rank drawn per step as the engine does."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step, batch in enumerate(counting(steps, seed=7)):
        opt.zero_grad()
        task_loss(model, batch)[0].backward()
        vpeft.on_step(model, step, steps)
        opt.step()
    return model.eval()


def mean_loss(model: nn.Module) -> float:
    held_out = counting(4, seed=8)
    with torch.no_grad():
        return sum(task_loss(model, x)[0].item() for x in held_out) / len(held_out)


def losses_at_every_rank(model: nn.Module, r: int) -> list[float]:
    out = []
    for b in range(1, r + 1):
        set_eval_rank(model, b)
        out.append(mean_loss(model))
    return out


@pytest.mark.usefixtures("one_thread")
def test_exports_at_the_evaluation_rank_as_a_lora_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base, model = adapted_llama()
    train(model, 6)
    set_eval_rank(model, 3)
    vpeft.export_hf_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    assert loaded.peft_config["default"].r == 3 and loaded.peft_config["default"].lora_alpha == 16
    batch = batches(1, seed=6)[0]
    with torch.no_grad():
        ours = task_loss(model, batch)[1]
        torch.testing.assert_close(task_loss(loaded, batch)[1], ours, rtol=0, atol=1e-5)
        back = copy.deepcopy(base)
        vpeft.import_hf_peft(back, tmp_path / "peft")  # the sidecar says: a LoRA of rank 3, alpha 16
        assert adapter_record(back).method == "lora" and adapter_record(back).config.r == 3
        torch.testing.assert_close(task_loss(back, batch)[1], ours, rtol=0, atol=1e-6)
        set_eval_rank(model, 8)
        assert not torch.allclose(task_loss(model, batch)[1], ours)


@pytest.mark.usefixtures("one_thread")
def test_after_training_every_rank_beats_the_frozen_model():
    base, model = adapted_llama()
    reference = mean_loss(base)
    losses = losses_at_every_rank(train(model, 60), 8)
    assert all(loss < reference - 0.02 for loss in losses), (reference, losses)
    assert losses[-1] < losses[0] - 0.02, losses  # the components beyond the first carry what was learnt too


if __name__ == "__main__":  # the docstring table: python -m tests.methods.test_dylora
    torch.set_num_threads(1)
    base, model = adapted_llama()
    print(f"frozen model loss {mean_loss(base):.2f}")
    print("rank b           " + " ".join(f"{b:5d}" for b in range(1, 9)))
    print("frozen=True      " + " ".join(f"{v:5.2f}" for v in losses_at_every_rank(train(model, 100), 8)))
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    vpeft.apply_method(model, "dylora", dropout=0.0, head=(), frozen=False)
    print("frozen=False     " + " ".join(f"{v:5.2f}" for v in losses_at_every_rank(train(model, 100), 8)))
    for r in (1, 8):  # LoRA trained at one rank, the same way, for comparison
        lora = copy.deepcopy(base)
        torch.manual_seed(0)  # A's init, as adapted_llama draws it
        vpeft.apply_method(lora, "lora", r=r, alpha=16.0, dropout=0.0, head=())
        print(f"lora r={r}: {mean_loss(train(lora, 100)):.2f}")
