"""VPT shallow and deep: prompt tokens after the class token, replaced per block (deep), stripped after the last."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import vpeft

from ..conftest import tiny_vit
from ._vit_reference import perturb, reference_forward


def _prompts(model, i):
    return model.blocks[i].adapters["default"]["all"].prompts


def _block_inputs(model):
    """Record the sequence each (base) block receives."""
    seen = {}
    for i, blk in enumerate(model.blocks):
        hook = lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone())  # noqa: E731
        getattr(blk, "base_layer", blk).register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("method,p", [("vpt_shallow", 50), ("vpt_deep", 10), ("vpt_deep", 3)])
def test_sequence_inside_blocks(images, method, p):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, num_prompts=p)
    seen = _block_inputs(model)
    with torch.no_grad():
        feats = model.forward_features(images)
    assert feats.shape == base.forward_features(images).shape == (2, 17, 64)  # prompts stripped after the last block
    assert [seen[i].shape[1] for i in range(2)] == [1 + p + 16] * 2
    torch.testing.assert_close(seen[0][:, 1 : 1 + p], _prompts(model, 0).expand(2, -1, -1), rtol=0, atol=0)
    if method == "vpt_deep":  # block 1 sees its own prompts in the p slots, not block 0's outputs
        torch.testing.assert_close(seen[1][:, 1 : 1 + p], _prompts(model, 1).expand(2, -1, -1), rtol=0, atol=0)
    else:
        assert _prompts(model, 1) is None
        assert not torch.allclose(seen[1][:, 1 : 1 + p], seen[0][:, 1 : 1 + p])


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_logits_equal_the_paper_forward(images, method):
    """Eq. 1-2 with the official head (final LN on all tokens, class token only): stripping changes nothing."""
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, num_prompts=4)
    perturb(model)
    p = 4

    def embed(x):
        return torch.cat([x[:, :1], _prompts(model, 0).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

    def block(i, blk, x):
        if method == "vpt_deep" and i > 0:
            x = torch.cat([x[:, :1], _prompts(model, i).expand(x.shape[0], -1, -1), x[:, 1 + p :]], dim=1)
        return blk(x)

    with torch.no_grad():
        torch.testing.assert_close(
            model(images), reference_forward(base, images, block, embed=embed), rtol=1e-5, atol=1e-5
        )


def test_average_pool_sees_only_the_original_patches(images):
    base = tiny_vit(global_pool="avg")
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "vpt_deep", num_prompts=4)
    perturb(model)

    def embed(x):
        return torch.cat([x[:, :1], _prompts(model, 0).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

    def block(i, blk, x):
        if i > 0:
            x = torch.cat([x[:, :1], _prompts(model, i).expand(x.shape[0], -1, -1), x[:, 5:]], dim=1)
        return blk(x)

    with torch.no_grad():
        ref = reference_forward(base, images, block, embed=embed, pool=lambda x: x[:, 5:].mean(1))
        torch.testing.assert_close(model(images), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_disabled_is_base_and_enabled_differs(images, method):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method)
    with torch.no_grad():
        assert not torch.allclose(model(images), base(images))  # prompts change the output from the start
        with vpeft.disabled(model):
            torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


def test_init_range_and_dropout(images):
    model = tiny_vit()
    vpeft.apply_method(model, "vpt_deep", patch_size=8, num_prompts=64)
    v = math.sqrt(6 / (3 * 8 * 8 + 64))
    for i in range(2):
        prompts = _prompts(model, i)
        assert prompts.abs().max() <= v and prompts.abs().max() > 0.9 * v
    model.train()
    seen = _block_inputs(model)
    model(images)
    inserted = seen[0][:, 1:65]
    assert (inserted == 0).any() and not torch.equal(inserted[0], _prompts(model, 0))  # dropout 0.1 on the prompts
    model = tiny_vit()
    vpeft.apply_method(model, "vpt_deep", dropout=0.0)
    assert isinstance(model.blocks[0].adapters["default"]["all"].dropout, torch.nn.Identity)


def test_single_block_inserts_and_strips(images):
    model = tiny_vit()
    vpeft.apply_method(model, "vpt_shallow", layers=(1,), num_prompts=2)
    seen = _block_inputs(model)
    with torch.no_grad():
        assert model.forward_features(images).shape == (2, 17, 64)
    assert seen[0].shape[1] == 17 and seen[1].shape[1] == 19


@pytest.mark.parametrize(
    "options", [{"num_prompts": 0}, {"dropout": 1.0}, {"patch_size": 0}, {"num_prefix_tokens": -1}]
)
@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_bad_options(method, options):
    with pytest.raises(ValueError, match=f"{method} option"):
        vpeft.apply_method(tiny_vit(), method, **options)


def test_counts_vit_b16(vit_b16):
    d = 768
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "vpt_shallow").trainable == 50 * d == 38_400
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "vpt_deep").trainable == 12 * 10 * d == 92_160
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "vpt_shallow", num_prompts=100).trainable == 100 * d
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "vpt_deep", num_prompts=100).trainable == 12 * 100 * d
    model = copy.deepcopy(vit_b16)
    vpeft.apply_method(model, "vpt_deep")
    v = model.blocks[3].adapters["default"]["all"].prompts.abs().max()
    assert 0.9 * 0.0625 < v <= 0.0625  # sqrt(6 / (3 * 16 * 16 + 768))


def test_grid_blocks_without_a_token_axis_are_refused_with_the_reason():
    sam = timm.create_model(
        "samvit_base_patch16", img_size=32, depth=2, embed_dim=32, num_heads=2, global_attn_indexes=(1,),
        window_size=2, neck_chans=16, num_classes=0,
    )  # fmt: skip
    vpeft.apply_method(sam, "vpt_deep", num_prompts=2)
    with pytest.raises(
        ValueError, match=r"vpt prepends tokens to \(B, N, D\) sequences; this block takes \(1, 2, 2, 32\)"
    ):
        sam(torch.randn(1, 3, 32, 32))
