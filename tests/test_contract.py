"""The contract every registered method keeps, checked on a tiny timm ViT (and a tiny HF BERT where it applies).

A method is covered by being in ``vpeft.methods.METHODS``: these tests are parametrised over the registry.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import adapter_names
from vpeft.errors import ConfigError
from vpeft.methods import ARCHITECTURE_METHODS, METHODS, TEXT_TOWER_METHODS, VIRTUAL_TOKEN_METHODS

from .conftest import perturb, tiny_vit

# CLIP text-tower methods have their contract on a tiny CLIP (tests/clip/); virtual-token methods and the methods that
# prune or rewrite named language-model blocks on the tiny language models (tests/lm/test_contract.py), and refuse a
# ViT (below)
ALL = sorted(set(METHODS) - set(TEXT_TOWER_METHODS) - set(VIRTUAL_TOKEN_METHODS) - set(ARCHITECTURE_METHODS))
# `frozen` (the zero- and few-shot reference point) trains nothing by design: the tests that train, perturb or
# differentiate its tensors have none to work on, and test_frozen_trains_nothing_and_changes_nothing checks it instead.
TRAINED = [m for m in ALL if m != "frozen"]


# Options that scale a method's defaults (set for ViT-B/16) down to the tiny test model. SPT: a budget that gives
# structured, sparse and vector entries on the tiny ViT, and no per-sample drop path (with a batch of 2 it can drop a
# whole module's update in the one step the gradient test looks at).
TINY_OPTIONS: dict[str, dict] = {
    "spt_lora": {"param_budget": 0.003, "drop_path": 0.0},
    "spt_adapter": {"param_budget": 0.003, "drop_path": 0.0},
    "sorsa": {"r": 8},  # the official r = 128 is above the tiny ViT's width (64)
}


def calibration_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


def adapted(method: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = tiny_vit()
    model = copy.deepcopy(base)
    calibration = calibration_batches() if METHODS[method].needs_calibration else None
    vpeft.apply_method(model, method, calibration=calibration, **TINY_OPTIONS.get(method, {}))
    return base, model


@pytest.mark.parametrize("method", ALL)
def test_output_at_init(method, images):
    base, model = adapted(method)
    if not METHODS[method].identity_at_init:
        pytest.skip(f"{method} changes the output at initialisation by design")
    torch.testing.assert_close(model(images), base(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", VIRTUAL_TOKEN_METHODS)
def test_virtual_token_methods_refuse_a_vit_and_name_vpt(method):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="holds no module with get_input_embeddings.*use vpt_shallow or vpt_deep"):
        vpeft.apply_method(model, method)
    assert adapter_names(model) == [] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


ARCHITECTURE_REASONS = {"light_peft": "fused qkv projection", "meft": "has no such encoder"}


@pytest.mark.parametrize("method", ARCHITECTURE_METHODS)
def test_block_rewriting_methods_refuse_a_vit_and_say_why(method):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=ARCHITECTURE_REASONS[method]):
        vpeft.apply_method(model, method)
    assert adapter_names(model) == [] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_frozen_trains_nothing_and_changes_nothing(images):
    base, model = adapted("frozen")
    report = vpeft.report(model)
    assert not any(p.requires_grad for p in model.parameters()) and report.trainable + report.head == 0
    assert set(model.state_dict()) == set(base.state_dict())
    with vpeft.disabled(model):
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


@pytest.mark.parametrize("method", TRAINED)
def test_only_method_tensors_train(method):
    base, model = adapted(method)
    report = vpeft.report(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable + report.head
    if METHODS[method].restorable:
        # adapter tensors sit under .adapters. (per target or head copy) or in vpeft_shared; base tensors are frozen
        assert all(".adapters." in n or n.startswith("vpeft_shared.") for n in trainable), trainable
        assert report.head == sum(p.numel() for p in base.head.parameters())
    else:
        assert trainable == {n for n, _ in base.named_parameters()}


@pytest.mark.parametrize("method", TRAINED)
def test_every_trainable_tensor_gets_gradient(method, images):
    _, model = adapted(method)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = torch.tensor([1, 2])
    for _ in range(2):  # after one step even zero-initialised factors (LoRA's B) pass gradient on
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not silent, f"no gradient reached {silent}"


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip(method, images, tmp_path):
    base, model = adapted(method)
    perturb(model)
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("method", ALL)
def test_merge_unmerge(method, images):
    base, model = adapted(method)
    perturb(model)
    expected = model(images)
    cls = METHODS[method]
    if not cls.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            vpeft.merge(model)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)  # nothing half-applied
        return
    vpeft.merge(model)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())
    if not cls.restorable:
        with pytest.raises(ValueError, match="no original model"):
            vpeft.unmerge(model)
        return
    vpeft.unmerge(model)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    if cls.releases_base:  # the full-precision weights were freed: disabled, the quantised base as first built
        with vpeft.disabled(model):
            torch.testing.assert_close(model(images), adapted(method)[1](images), rtol=0, atol=0)
        return
    for key, value in base.state_dict().items():  # the original weights are back
        torch.testing.assert_close(_base_value(model, key), value, rtol=1e-5, atol=1e-6)


def _base_value(model: torch.nn.Module, key: str) -> torch.Tensor:
    """A base tensor of a wrapped model, found through the wrappers' ``base_layer``."""
    for name, value in model.state_dict().items():
        if name.replace(".base_layer", "") == key:
            return value
    raise KeyError(key)


@pytest.mark.parametrize("method", TRAINED)
def test_disable_gives_base_output(method, images):
    base, model = adapted(method)
    initial = model(images)
    perturb(model)
    if not METHODS[method].restorable:
        with pytest.raises(ValueError, match="no original model"):
            with vpeft.disabled(model):
                pass
        return
    if METHODS[method].releases_base:  # the full-precision weights are gone: the quantised base as first built
        base = lambda x: initial  # noqa: E731
    with vpeft.disabled(model):
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)
    assert not torch.allclose(model(images), base(images))


@pytest.mark.parametrize("method", TRAINED)
def test_adapters_are_made_in_the_base_dtype(method, images):
    """Applied to a model already cast (or moved to a GPU), a method's tensors follow the base: a float64 model gets
    float64 adapters, computes what the float32 one does, and trains in float64."""
    model = tiny_vit().double()
    calibration = [(x.double(), y) for x, y in calibration_batches()] if METHODS[method].needs_calibration else None
    vpeft.apply_method(model, method, calibration=calibration, **TINY_OPTIONS.get(method, {}))
    out = model(images.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), adapted(method)[1](images), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float64}
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in trainable)
