"""UniR on the tiny LMs: the composed logits are the frozen backbone's plus the weighted reasoners' (each computed
on its own); training the reasoner (GRPO and NLL) leaves every backbone tensor bit-identical and gives the backbone
no gradient; GRPO's group advantages by hand; GRPO raises a verifiable reward; a LoRA reasoner (vpeft) on another
architecture composes over the shared vocabulary; a reasoner with another vocabulary is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.errors import ConfigError
from vpeft.unir import UniR, completion_log_probs, group_advantages, grpo_loss, nll_loss

from .models import VOCAB, batches, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_logits_are_the_sum_of_the_backbone_and_the_weighted_reasoners():
    backbone, r1, r2 = tiny_llama(), tiny_gpt2(), tiny_llama(layers=1)
    ids = batches(1)[0]["input_ids"]
    model = UniR(backbone, [r1, r2], weights=[0.5, 2.0])
    with torch.no_grad():
        expected = backbone(input_ids=ids).logits + 0.5 * r1(input_ids=ids).logits + 2.0 * r2(input_ids=ids).logits
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_grpo_and_nll_training_leave_the_backbone_bit_identical():
    backbone, reasoner = tiny_llama(), tiny_gpt2()
    before, reasoner_before = snapshot(backbone), snapshot(reasoner)
    model = UniR(backbone, reasoner).train()
    assert not backbone.training and reasoner.training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    prompts = batches(1, length=4)[0]["input_ids"][:2]
    for step in range(3):
        opt.zero_grad()
        loss, _ = grpo_loss(model, prompts, lambda p, c: (c[:, 0] < 10).float(), group=4, new_tokens=3, generator=g)
        batch = batches(1, seed=step)[0]
        (loss + nll_loss(model, batch["input_ids"], batch["attention_mask"])).backward()
        assert all(p.grad is None for p in backbone.parameters())
        opt.step()
    assert_bit_identical(backbone, before)
    assert not all(torch.equal(reasoner.state_dict()[k], reasoner_before[k]) for k in reasoner_before)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    for row, got in zip(rewards, group_advantages(rewards), strict=True):
        mean, std = sum(row.tolist()) / 4, float(torch.tensor(row.tolist()).std())  # unbiased, as TRL's
        torch.testing.assert_close(got, torch.tensor([(r - mean) / (std + 1e-4) for r in row.tolist()]))


def test_completion_log_probs_are_the_policy_of_each_sampled_token():
    model = UniR(tiny_llama(), tiny_gpt2())
    seq = batches(1, length=7)[0]["input_ids"]
    got = completion_log_probs(model, seq, 4)
    with torch.no_grad():
        for t in range(4, 7):
            logp = torch.log_softmax(model(seq[:, :t])[:, -1], -1)
            torch.testing.assert_close(
                got[:, t - 4].detach(), logp.gather(1, seq[:, t : t + 1]).squeeze(1), rtol=1e-4, atol=1e-5
            )


def test_grpo_raises_a_verifiable_reward():
    """Reward 1 when the first new token is one of ten (about 1 in 6 at the start): 15 GRPO steps on a GPT-2
    reasoner composed with a frozen Llama make it the likely answer (0.17 -> 0.97 on this seed); the Llama does not
    change."""
    backbone, reasoner = tiny_llama(), tiny_gpt2()
    before = snapshot(backbone)
    model = UniR(backbone, reasoner)
    prompts = batches(1, length=4, batch=4)[0]["input_ids"]
    good = torch.zeros(VOCAB, dtype=torch.bool)
    good[10:20] = True

    def mass() -> float:
        with torch.no_grad():
            return float(torch.softmax(model(prompts)[:, -1], -1)[:, good].sum(-1).mean())

    start = mass()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        opt.zero_grad()
        loss, _ = grpo_loss(model, prompts, lambda p, c: good[c[:, 0]].float(), group=6, new_tokens=1, generator=g)
        loss.backward()
        opt.step()
    assert start < 0.2 and mass() > 0.8
    assert_bit_identical(backbone, before)


def test_a_lora_reasoner_of_another_architecture_composes_and_only_its_adapter_trains():
    backbone, reasoner = tiny_llama(), tiny_gpt2()
    vpeft.apply_method(reasoner, "lora", targets=("c_attn", "c_proj"), r=4, alpha=8.0, dropout=0.0, head=())
    before, reasoner_before = snapshot(backbone), snapshot(reasoner)
    model = UniR(backbone, reasoner)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(3):
        opt.zero_grad()
        nll_loss(model, batch["input_ids"], batch["attention_mask"]).backward()
        opt.step()
    assert_bit_identical(backbone, before)
    changed = {k for k, v in reasoner.state_dict().items() if not torch.equal(v, reasoner_before[k])}
    assert changed and all("lora_" in k for k in changed)


def test_mistakes_are_config_errors():
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB + 1, n_embd=8, n_layer=1, n_head=1))
    with pytest.raises(ConfigError, match="vocab_size"):
        UniR(tiny_llama(), small)
    with pytest.raises(ConfigError, match="one weight per reasoner"):
        UniR(tiny_llama(), [tiny_gpt2()], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="group"):
        grpo_loss(
            UniR(tiny_llama(), copy.deepcopy(tiny_gpt2())),
            torch.ones(1, 2, dtype=torch.long),
            lambda p, c: c[:, 0],
            group=1,
        )
