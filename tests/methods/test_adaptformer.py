"""AdaptFormer: a parallel bottleneck beside the MLP sub-block, fed the residual stream (official placement)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft

from ..conftest import tiny_vit
from ._vit_reference import perturb, reference_forward


def _layer(model, i):
    return model.blocks[i].mlp.adapters["default"]["all"]


def _reference(base, model, images, scale, normed_input):
    def block(i, blk, x):
        a = _layer(model, i)
        x = x + blk.attn(blk.norm1(x))
        u = blk.norm2(x) if normed_input else x  # official: the residual stream itself
        f = F.linear(F.relu(F.linear(u, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        return x + blk.mlp(blk.norm2(x)) + scale * f

    return reference_forward(base, images, block)


@pytest.mark.parametrize("scale", [0.1, 2.0])
def test_parallel_to_norm2_and_mlp_reading_the_residual_stream(images, scale):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "adaptformer", scale=scale)
    perturb(model)
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(
            out, _reference(base, model, images, scale, normed_input=False), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(out, _reference(base, model, images, scale, normed_input=True), atol=1e-3)


def test_mlp_only_targets_read_the_mlp_input(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "adaptformer", targets=("mlp",))
    assert not model.vpeft_shared["default"].taps.active and model.vpeft_shared.state_dict() == {}
    assert [row[0] for row in report.rows] == ["blocks.0.mlp", "blocks.1.mlp"]
    perturb(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(images), _reference(base, model, images, 0.1, normed_input=True), rtol=1e-5, atol=1e-5
        )


def test_init(images):
    model = tiny_vit()
    vpeft.apply_method(model, "adaptformer")
    a = _layer(model, 1)
    for t in (a.down.bias, a.up.weight, a.up.bias):
        assert torch.count_nonzero(t) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64, as nn.Linear
    assert a.down.weight.abs().max() <= bound and a.down.weight.std() > 0.3 * bound
    assert not hasattr(model.blocks[0].norm2.adapters["default"]["all"], "down")  # the tap holds no tensors


def test_unpaired_norm_or_mlp_is_refused():
    with pytest.raises(ValueError, match="unpaired"):
        vpeft.apply_method(tiny_vit(), "adaptformer", exclude=("blocks.1.norm2",))
    with pytest.raises(ValueError, match="unpaired"):
        vpeft.apply_method(tiny_vit(), "adaptformer", exclude=("blocks.0.mlp",))
    model = tiny_vit()
    vpeft.apply_method(model, "adaptformer", layers=(1,))  # both filtered together: fine
    assert [r[0] for r in vpeft.report(model).rows] == ["blocks.1.norm2", "blocks.1.mlp"]


def test_mlp_called_without_its_norm_raises():
    model = tiny_vit()
    vpeft.apply_method(model, "adaptformer")
    with pytest.raises(RuntimeError, match="without its norm"):
        model.blocks[0].mlp(torch.randn(2, 17, 64))


def test_stash_is_emptied_and_not_saved(images):
    model = tiny_vit()
    vpeft.apply_method(model, "adaptformer")
    model(images)
    assert model.vpeft_shared["default"].taps.stash == {}
    assert model.vpeft_shared.state_dict() == {}


@pytest.mark.parametrize("options", [{"dim": 0}, {"scale": float("nan")}, {"dropout": -0.1}])
def test_bad_options(options):
    with pytest.raises(ValueError, match="adaptformer option"):
        vpeft.apply_method(tiny_vit(), "adaptformer", **options)


def test_count_vit_b16(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "adaptformer")
    assert report.trainable == 12 * (768 * 8 + 8 + 8 * 768 + 768) == 156_768
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "adaptformer", dim=64)
    assert report.trainable == 1_189_632
