"""``generate()`` on an adapted causal LM: every mergeable method that applies to the tiny GPT-2 or Llama.

Greedy decoding with the KV cache (the default) gives the same tokens unmerged, without the cache, and merged;
``disabled()`` gives the base model's tokens. The prompts are a batch with one left-padded row, as decoders are
batched for generation.
"""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft.methods import METHODS

from .models import VOCAB
from .test_contract import APPLIED, adapted

CASES = [(method, lm) for method, lm in APPLIED if lm in ("gpt2", "llama") and METHODS[method].mergeable]
NEW_TOKENS = 8
# the size of the random update added to the trainable tensors. HUT's update is proportional to W0 (W0 ⊙ s B A): at
# 0.5 it changes GPT-2's q and v by about their own size, which leaves the tiny model's greedy tokens as they were
PERTURBATION = {"hut": 2.0}
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two contending threads are many times slower


def prompts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # the second prompt is 4 tokens, padded on the left
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model: torch.nn.Module, use_cache: bool = True) -> torch.Tensor:
    """``NEW_TOKENS`` greedy tokens (end-of-text suppressed, so each row has them all)."""
    out = model.generate(
        **prompts(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        use_cache=use_cache,
    )  # fmt: skip
    assert out.shape == (2, 6 + NEW_TOKENS)
    return out[:, 6:]


def test_the_cases_cover_lora_and_dora_on_both_decoders():
    assert {("lora", "gpt2"), ("lora", "llama"), ("dora", "gpt2"), ("dora", "llama")} <= set(CASES)


@pytest.mark.parametrize(("method", "lm"), CASES)
def test_generate_unmerged_equals_merged_and_disabled_equals_base(method, lm):
    base, model = adapted(method, lm)
    # disabled, a released base (quantised, its full-precision weights freed) runs as first built: the base it gives
    base_tokens = greedy(model if METHODS[method].releases_base else base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a large update, so that the adapted model picks other tokens than the base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(PERTURBATION.get(method, 0.5) * torch.randn(p.shape, generator=g))
    tokens = greedy(model)
    assert not torch.equal(tokens, base_tokens), "the update does not change generation: the test would prove nothing"
    torch.testing.assert_close(greedy(model, use_cache=False), tokens, rtol=0, atol=0)
    if METHODS[method].restorable:
        with vpeft.disabled(model):
            torch.testing.assert_close(greedy(model), base_tokens, rtol=0, atol=0)
    vpeft.merge(model)
    torch.testing.assert_close(greedy(model), tokens, rtol=0, atol=0)
