"""The contract of every registered method on three tiny language models: BERT (separate q/k/v, a classifier head),
GPT-2 (one fused ``c_attn`` Conv1D, weights stored (in, out)) and Llama (grouped-query attention, RMS norms, no bias).

Every pair (method, model) is covered: the method applies and keeps the contract below, or it is in ``REFUSALS`` and
refuses with a :class:`~vpeft.errors.UserError` that says why, leaving the model as it was. A method that starts to
apply where it refused, or refuses where it applied, fails here; a new method joins through ``vpeft.methods.METHODS``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import adapter_names
from vpeft.errors import UserError
from vpeft.methods import METHODS

from ..conftest import perturb
from .models import TINY_LMS, batches, task_loss

# Options that fit a method's defaults (set for ViT-B/16, 768 wide) to 32-wide models. FacT-TK's r=32 is the full
# width of the tiny models (Llama's grouped k/v projections are 16 wide), which its rank check refuses; 32 fits every
# real LM. SALT's r_lora=256 is above the width too, but its rank option is lenient by design (a warning), so it stays.
LM_OPTIONS: dict[str, dict] = {
    "fact_tk": {"r": 8},
    "sorsa": {"r": 8},  # the official r = 128 (Llama-2-7B) is above the tiny models' widths
}

# (method, model) -> a phrase of the reason it refuses. Vision methods by their paper (prompt tokens, a convolution or
# an FFT over the patch grid) refuse every LM for want of a patch embedding. Methods whose defaults name timm modules
# (norm1, patch_embed) refuse models that lack them, naming what is missing; so do those that need a fused qkv
# projection (RepAdapter merges into the one layer that reads its output, SALT takes the SVD of the fused weight) on
# models with separate q/k/v, and AdaptFormer and DVPT, which tap the residual stream at the norm before the MLP, on
# post-norm BERT, which has none. BitFit has no bias to tune on Llama; the linear probe has nothing to train on a
# causal LM without a task head.
_GRID = "has no patch embedding"
_VISION = {"convpass": _GRID, "earth_adapter": _GRID, "vpt_shallow": _GRID, "vpt_deep": _GRID}
_TIMM_NAMES = {
    "spt_lora": "target 'norm1' matches no module",
    "spt_adapter": "target 'norm1' matches no module",
    "ssf": "target 'patch_embed.proj' matches no module",
    "coop": "target 'token_embedding' matches no module",  # prompt context of a CLIP text tower (open_clip's name)
}
_ON_BERT_AND_LLAMA = {"repadapter": "role 'qkv' .* matches no module", "salt": "role 'qkv' .* matches no module"}
_ON_BERT = {
    "adaptformer": "role 'mlp_norm' .* matches no module",
    "dvpt": "role 'mlp_norm' .* matches no module",
    "convpass": "role 'attn' .* matches no module",  # refused at target selection, before its grid check
}
REFUSALS: dict[tuple[str, str], str] = {
    **{(method, lm): why for method, why in (_VISION | _TIMM_NAMES).items() for lm in TINY_LMS},
    **{(method, lm): why for method, why in _ON_BERT_AND_LLAMA.items() for lm in ("bert", "llama")},
    **{(method, "bert"): why for method, why in _ON_BERT.items()},
    ("bitfit", "llama"): "layers with a bias term",
    ("linear", "gpt2"): "no task head",
    ("light_peft", "gpt2"): "fused qkv projection",  # physical head pruning: BERT- and Llama-style blocks only
    ("meft", "gpt2"): "has no such encoder",  # the reversible rewrite: BERT-style encoders only
    ("meft", "llama"): "has no such encoder",
    ("linear", "llama"): "no task head",
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two contending threads are many times slower

PAIRS = [(method, lm) for method in sorted(METHODS) for lm in sorted(TINY_LMS)]
# the contract below trains: a reference point that trains nothing (frozen) is checked in the applies-or-refuses test
APPLIED = [pair for pair in PAIRS if pair not in REFUSALS and METHODS[pair[0]].trains]


def test_the_refusal_table_names_registered_pairs_only():
    assert set(REFUSALS) <= set(PAIRS), sorted(set(REFUSALS) - set(PAIRS))


def calibration(method: str) -> list | None:
    """Loss callables for methods that decide from data (SPT), as tools/train.py passes them."""
    if not METHODS[method].needs_calibration:
        return None
    return [lambda model, batch=batch: task_loss(model, batch)[0] for batch in batches(2, seed=5)]


def adapted(method: str, lm: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = TINY_LMS[lm]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, calibration=calibration(method), **LM_OPTIONS.get(method, {}))
    return base, model


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], list[tuple[str, type]]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, [(n, type(m)) for n, m in model.named_modules()]


@pytest.mark.parametrize(("method", "lm"), PAIRS)
def test_applies_or_refuses_with_the_reason_and_changes_nothing(method, lm):
    model = TINY_LMS[lm]()
    before = snapshot(model)
    options = LM_OPTIONS.get(method, {})
    if (method, lm) not in REFUSALS:
        report = vpeft.apply_method(model, method, calibration=calibration(method), **options)
        assert (report.trainable + report.head > 0) == METHODS[method].trains
        if not METHODS[method].trains:  # nothing trainable, and the model computes what it did
            assert not any(p.requires_grad for p in model.parameters())
            batch = batches(1)[0]
            torch.testing.assert_close(logits(model, batch), logits(TINY_LMS[lm](), batch), rtol=0, atol=0)
        return
    with pytest.raises(UserError, match=REFUSALS[method, lm]) as refusal:
        vpeft.apply_method(model, method, calibration=calibration(method), **options)
    assert "\n" not in str(refusal.value)  # one paragraph
    state, flags, modules = snapshot(model)
    assert flags == before[1] and modules == before[2] and adapter_names(model) == []
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_output_at_init(method, lm):
    base, model = adapted(method, lm)
    batch = batches(1)[0]
    if METHODS[method].identity_at_init:
        torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=0)
    else:
        assert not torch.allclose(logits(model, batch), logits(base, batch))


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_every_trainable_tensor_and_no_frozen_one_gets_a_finite_gradient(method, lm):
    _, model = adapted(method, lm)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    for batch in batches(2, seed=1):  # after one step even zero-initialised factors (LoRA's B) pass gradient on
        opt.zero_grad()
        task_loss(model, batch)[0].backward()
        opt.step()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not silent, f"no gradient reached {silent}"
    infinite = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.isfinite().all()]
    assert not infinite, infinite
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen tensors got a gradient: {frozen}"


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_an_adamw_step_changes_the_logits(method, lm):
    _, model = adapted(method, lm)
    batch = batches(1, seed=3)[0]
    before = logits(model, batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    task_loss(model, batch)[0].backward()
    opt.step()
    model.eval()
    assert not torch.allclose(logits(model, batch), before)


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_report_counts_the_trainable_tensors(method, lm):
    _, model = adapted(method, lm)
    report = vpeft.report(model)
    assert report.trainable + report.head == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_save_load_round_trip(method, lm, tmp_path):
    base, model = adapted(method, lm)
    perturb(model)
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    batch = batches(1, seed=4)[0]
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_disabled_gives_the_base_output(method, lm):
    base, model = adapted(method, lm)
    batch = batches(1, seed=4)[0]
    expected = logits(model if METHODS[method].releases_base else base, batch)  # a released base: as first built
    perturb(model)
    if not METHODS[method].restorable:
        with pytest.raises(ValueError, match="no original model"):
            with vpeft.disabled(model):
                pass
        return
    with vpeft.disabled(model):
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, batch), logits(base, batch))


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_merge_equals_unmerged_and_unmerge_restores(method, lm):
    base, model = adapted(method, lm)
    batch = batches(1, seed=4)[0]
    original = logits(model if METHODS[method].releases_base else base, batch)  # a released base: as first built
    perturb(model)
    expected = logits(model, batch)
    cls = METHODS[method]
    if not cls.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            vpeft.merge(model)
        torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)  # nothing half-applied
        return
    vpeft.merge(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())
    if not cls.restorable:
        with pytest.raises(ValueError, match="no original model"):
            vpeft.unmerge(model)
        return
    vpeft.unmerge(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    with vpeft.disabled(model):  # the original weights are back (a released base's, as first built: bit for bit)
        torch.testing.assert_close(logits(model, batch), original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "lm"), APPLIED)
def test_adapters_are_made_in_the_base_dtype(method, lm):
    """Applied to a model already cast to float64, a method's tensors follow it and compute what float32 ones do."""
    model = TINY_LMS[lm]().double()
    vpeft.apply_method(model, method, calibration=calibration(method), **LM_OPTIONS.get(method, {}))
    batch = batches(1, seed=4)[0]
    out = logits(model, batch)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), logits(adapted(method, lm)[1], batch), rtol=1e-4, atol=1e-4)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float64}
