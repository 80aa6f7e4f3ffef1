"""DVPT: shared bottleneck, prompts cross-attending its features, tokens reading the dynamic prompts back."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vpeft

from ..conftest import tiny_vit
from ._vit_reference import perturb, quick_gelu, reference_forward


def _layer(model, i):
    return model.blocks[i].mlp.adapters["default"]["all"]


def _shared(model):
    return model.vpeft_shared["default"]


def _update(u, prompts, down_w, down_b, up_w, up_b, gate):
    """The paper's DVPT update, written out with einsum: prompts query the bottleneck, tokens query the prompts."""
    z = quick_gelu(u @ down_w.T + down_b)  # (B, N, c)
    c = z.shape[-1]
    a = torch.softmax(torch.einsum("mc,bnc->bmn", prompts, z) / math.sqrt(c), dim=-1)  # (B, M, N)
    o = torch.einsum("bmn,bnc->bmc", a, z)  # (B, M, c)
    r = torch.einsum("bnm,bmc->bnc", torch.softmax(torch.einsum("bnc,bmc->bnm", z, o) / math.sqrt(c), dim=-1), o)
    return gate * (r @ up_w.T + up_b)  # (B, N, C)


def _reference(base, model, images, normed_input=False):
    sh = _shared(model)

    def block(i, blk, x):
        layer = _layer(model, i)
        k = layer.group
        x = x + blk.attn(blk.norm1(x))
        u = blk.norm2(x) if normed_input else x
        upd = _update(u, layer.prompts, sh.down[k].weight, sh.down[k].bias, sh.up[k].weight, sh.up[k].bias, sh.gate[k])
        return x + blk.mlp(blk.norm2(x)) + upd

    return reference_forward(base, images, block)


@pytest.mark.parametrize("share_every", [1, 3])
def test_forward_equals_hand_written_cross_attention(images, share_every):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dvpt", share_every=share_every, num_prompts=3, latent=5)
    assert [_layer(model, i).group for i in range(2)] == ([0, 1] if share_every == 1 else [0, 0])
    assert len(_shared(model).down) == (2 if share_every == 1 else 1)
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(model(images), _reference(base, model, images), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(images), _reference(base, model, images, normed_input=True), atol=1e-3)


def test_mlp_only_targets_read_the_mlp_input(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dvpt", targets=("mlp",))
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(images), _reference(base, model, images, normed_input=True), rtol=1e-5, atol=1e-5
        )


def test_cross_attention_drives_the_output_once_up_projection_moves(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dvpt")
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=1e-6)  # zero up projection
        _layer(model, 0).prompts.normal_()  # prompts alone do nothing while W_u = 0
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=1e-6)
        _shared(model).up[0].weight.normal_(std=0.5)
        before = model(images)
        assert not torch.allclose(before, base(images), atol=1e-4)
        _layer(model, 0).prompts.mul_(-3.0)  # only the cross-attention queries change
        after = model(images)
        assert not torch.allclose(before, after, atol=1e-5)
    model.train()
    F.cross_entropy(model(images), torch.tensor([1, 2])).backward()
    assert _layer(model, 0).prompts.grad.abs().sum() > 0


def test_disabled_equals_base(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "dvpt")
    perturb(model)
    with vpeft.disabled(model), torch.no_grad():
        torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)


def test_vit_b16_count_follows_the_formula(vit_b16):
    model = copy.deepcopy(vit_b16)
    report = vpeft.apply_method(model, "dvpt")
    C, c, M, L, share = 768, 20, 10, 12, 3
    groups = math.ceil(L / share)
    expected = groups * (C * c + c + c * C + C + 1) + L * M * c
    assert expected == 4 * 31_509 + 2_400 == 128_436
    assert report.trainable == expected
    assert sum(p.numel() for p in model.vpeft_shared.parameters()) == groups * 31_509


def test_bad_options():
    with pytest.raises(ValueError, match="latent"):
        vpeft.apply_method(tiny_vit(), "dvpt", latent=0)
    with pytest.raises(ValueError, match="pairs each MLP"):
        vpeft.apply_method(tiny_vit(), "dvpt", targets=("mlp", "norm2"), exclude=("blocks.0.norm2",))
