"""Prompt tuning and prefix tuning (vpeft/core/virtual.py's call rewrite) against HF PEFT, ``generate()`` and the
core's other entry points.

- Equal to HF PEFT 0.21 (``PromptTuningConfig``, ``PrefixTuningConfig`` with and without ``prefix_projection``) on the
  tiny Llama (grouped-query attention) and GPT-2 (fused Conv1D attention): logits within 1e-5 at every one of 5 AdamW
  steps with a padded row in every batch, padded on the right and on the left. PEFT's outputs keep the prompt
  positions, vpeft's do not: PEFT's logits are compared from position p on.
- ``generate()`` with the key/value cache gives the tokens of a greedy loop that recomputes the whole sequence at every
  step without a cache (which is also HF PEFT's forward, shown equal above); a left-padded row decodes as it does alone.
- all-MiniLM-L6-v2: 7,680 (prompt, 20 tokens) and 92,160 (prefix, 20 tokens) trainable parameters, PEFT's counts.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vpeft
from vpeft.core import adapter_tensors
from vpeft.errors import ConfigError

from .equivalence import peft
from .models import TINY_LMS, batches, task_loss

pytestmark = pytest.mark.usefixtures("one_thread")

P = 5  # virtual tokens in the tiny tests

# vpeft key (on the input embedding) -> PEFT's parameter name (PEFT keeps the prompt encoder outside the base model)
PEFT_PROMPT_NAMES = {
    "prompts": "prompt_encoder.default.embedding.weight",
    "prefix": "prompt_encoder.default.embedding.weight",
    "tokens": "prompt_encoder.default.embedding.weight",
    "transform.0.weight": "prompt_encoder.default.transform.0.weight",
    "transform.0.bias": "prompt_encoder.default.transform.0.bias",
    "transform.2.weight": "prompt_encoder.default.transform.2.weight",
    "transform.2.bias": "prompt_encoder.default.transform.2.bias",
}


def their_name(key: str) -> str:
    return PEFT_PROMPT_NAMES[key.split(".all.", 1)[1]]


def peft_config(method: str, options: dict):
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=options.get("projection", False),
        encoder_hidden_size=options.get("projection_width"),
    )  # fmt: skip


def side_by_side(make_model, method: str, options: dict, padding: str, steps: int = 5, lr: float = 1e-2):
    """Max |vpeft - PEFT| of the logits at each step, and how far training moved vpeft's logits."""
    base = make_model()
    ours = copy.deepcopy(base)
    vpeft.apply_method(ours, method, num_virtual_tokens=P, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(method, options))
    mine = {k: v for k, v in adapter_tensors(ours, "default").items() if v.requires_grad}
    params = dict(theirs.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {their_name(k) for k in mine}
    with torch.no_grad():
        for key, value in mine.items():
            params[their_name(key)].copy_(value)
    skip = P if method == "prompt_tuning" else 0  # PEFT's outputs keep the prompt positions
    data = batches(steps + 1, padding=padding)
    start = task_loss(ours, data[-1])[1].detach()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (ours, theirs)]
    diffs = []
    for step in range(steps + 1):
        outputs = []
        for model, optimizer, cut in zip((ours, theirs), optimizers, (0, skip), strict=True):
            loss, logits = task_loss(model, data[step], skip=cut)
            outputs.append(logits.detach())
            if step < steps:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        diffs.append((outputs[0] - outputs[1]).abs().max().item())
    return diffs, (outputs[0] - start).abs().max().item()


VARIANTS = [
    ("prompt_tuning", {}),
    ("prefix_tuning", {}),
    ("prefix_tuning", {"projection": True, "projection_width": 24}),
]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("lm", ["llama", "gpt2"])
@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=["prompt", "prefix", "prefix-mlp"])
def test_equal_to_hf_peft_after_five_adamw_steps_with_padding(method, options, lm, padding):
    diffs, moved = side_by_side(TINY_LMS[lm], method, options, padding)
    assert max(diffs) < 1e-5, diffs
    assert moved > 1e-2  # training moved the logits: the agreement is not agreement at rest


def greedy_without_cache(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by recomputing the whole sequence at every step, positions from the mask as generate's."""
    for _ in range(new):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return ids


def trained(make_model, method: str, options: dict) -> torch.nn.Module:
    model = make_model()
    vpeft.apply_method(model, method, num_virtual_tokens=P, **options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for batch in batches(3, seed=2):
        opt.zero_grad()
        task_loss(model, batch)[0].backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=["prompt", "prefix", "prefix-mlp"])
def test_generate_with_the_cache_equals_greedy_recomputation_and_left_padding(method, options, lm):
    model = trained(TINY_LMS[lm], method, options)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 60, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = 0, 0  # left padding
    new = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        alone = model.generate(input_ids=ids[2:, 2:], max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(model, ids, mask, new))
    assert torch.equal(out[2, 2:], alone[0])
    with torch.no_grad(), vpeft.disabled(model):  # the virtual tokens change what the model says
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(base, greedy_without_cache(TINY_LMS[lm](), ids, mask, new))
    assert not torch.equal(out, base)


def peft_copy(ours, make_model, method: str, options: dict):
    """The HF PEFT model with the trained tensors of ``ours``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft_config(method, options))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in adapter_tensors(ours, "default").items():
            params[their_name(key)].copy_(value)
    return theirs


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=["prompt", "prefix", "prefix-mlp"])
def test_generate_gives_the_tokens_of_hf_peft_forward(method, options, lm):
    """HF PEFT 0.21.2's own ``generate()`` is no oracle on transformers 5.24: it looks for ``past_key_values`` where
    generate now passes ``cache``, so prefix tuning decodes the base model's tokens and prompt tuning re-prepends its
    prompts at every step. Its forward is (the equivalence test above), so greedy decoding through PEFT's forward,
    recomputing the whole sequence at every step, is the reference for vpeft's cached ``generate()``."""
    ours = trained(TINY_LMS[lm], method, options)
    theirs = peft_copy(ours, TINY_LMS[lm], method, options)
    ids = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        mine = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, greedy_without_cache(theirs, ids, mask, 6))


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
@pytest.mark.parametrize(("method", "options"), VARIANTS, ids=["prompt", "prefix", "prefix-mlp"])
def test_exported_adapter_loads_in_hf_peft_with_the_same_logits(method, options, lm, tmp_path):
    ours = trained(TINY_LMS[lm], method, options)
    vpeft.export_hf_peft(ours, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(TINY_LMS[lm](), str(tmp_path / "hf"))
    for padding in ("right", "left"):
        batch = batches(1, seed=9, padding=padding)[0]
        with torch.no_grad():
            mine = task_loss(ours, batch)[1]
            their = task_loss(theirs, batch, skip=P if method == "prompt_tuning" else 0)[1]
        torch.testing.assert_close(their, mine, rtol=0, atol=1e-5)


def test_export_refuses_a_model_that_holds_the_transformers_model():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = TINY_LMS["llama"]()

    model = Holder()
    vpeft.apply_method(model, "prompt_tuning", num_virtual_tokens=P)
    with pytest.raises(ConfigError, match="Export from that model"):
        vpeft.export_hf_peft(model, "unused")
