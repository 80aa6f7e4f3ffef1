"""CoOp on the tiny CLIP: the context takes the placeholders' places, only it trains, the method's contract holds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones.open_clip import clip_tokenizer
from vpeft.errors import ConfigError
from vpeft.methods import METHODS

from .conftest import tiny_classifier

M = 4
PROMPT = ("X X X X {}.",)


def coop_model(config: str, n_ctx: int = M):
    base = tiny_classifier(config, templates=PROMPT)
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "coop", n_ctx=n_ctx)
    return base, model, report


def test_context_equal_to_the_placeholder_embedding_gives_the_base_prompt(tiny_config, clip_images):
    base, model, _ = coop_model(tiny_config)
    placeholder = clip_tokenizer(tiny_config)(["X"])[0, 1]  # [SOT] X [EOT]
    (ctx,) = [p for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        ctx.copy_(base.text.token_embedding.weight[placeholder].expand_as(ctx))
    model.eval()
    with torch.no_grad():  # both through nn.MultiheadAttention's inference path (base tensors that train take another)
        torch.testing.assert_close(model(clip_images), base(clip_images), rtol=0, atol=0)


def test_only_the_context_trains_and_it_gets_the_gradient(tiny_config, clip_images):
    _, model, report = coop_model(tiny_config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 1 and next(iter(trainable.values())).shape == (M, 16)
    assert report.trainable == M * 16 and report.head == 0
    model.train()
    F.cross_entropy(model(clip_images), torch.tensor([0, 1, 2])).backward()
    assert next(iter(trainable.values())).grad.abs().sum() > 0


def test_context_init_is_the_papers_normal(tiny_config):
    torch.manual_seed(0)
    base = tiny_classifier(tiny_config, templates=("X " * 16 + "{}.",))
    vpeft.apply_method(base, "coop", init_std=0.02)  # M = 16 by default
    (ctx,) = [p for p in base.parameters() if p.requires_grad]
    assert ctx.shape == (16, 16)
    assert 0.015 < ctx.std().item() < 0.025 and abs(ctx.mean().item()) < 0.01


def test_prompts_without_placeholders_are_refused(tiny_config, clip_images):
    model = tiny_classifier(tiny_config)  # "a photo of a {}." has no run of M equal words
    vpeft.apply_method(model, "coop", n_ctx=M)
    with pytest.raises(ConfigError, match="4 copies of one placeholder word"):
        model(clip_images)


def test_save_load_disable_and_merge_refusal(tiny_config, clip_images, tmp_path):
    base, model, _ = coop_model(tiny_config)
    model.eval()
    expected = model(clip_images)
    vpeft.save_adapter(model, tmp_path / "coop")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "coop")
    torch.testing.assert_close(fresh.eval()(clip_images), expected, rtol=0, atol=0)
    with vpeft.disabled(model), torch.no_grad():
        model.eval()  # the kept class embeddings belong to the adapted tower
        torch.testing.assert_close(model(clip_images), base(clip_images), rtol=0, atol=0)
    assert not METHODS["coop"].mergeable
    with pytest.raises(ValueError, match="cannot be merged"):
        vpeft.merge(model)
