"""SimpleFeaturePyramid (ViTDet): output sizes, strides, the locality of each rescaling op, multi-level routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vpeft.heads.pyramid import SimpleFeaturePyramid


def test_one_map_gives_one_output_per_scale():
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(64, 32)
    outs = neck([torch.randn(2, 64, 4, 6)])
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    assert neck.out_channels == 32
    assert neck.strides(16) == [4, 8, 16, 32] and neck.strides(8) == [2, 4, 8, 16]


def test_half_scale_is_max_pooling_and_identity_keeps_the_map():
    neck = SimpleFeaturePyramid(8, 8, scales=(1.0, 0.5))
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(neck.rescale[1](x), F.max_pool2d(x, 2))
    torch.testing.assert_close(neck.rescale[0](x), x)


@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_upsampling_is_non_overlapping(scale):
    """2x2 stride-2 transposed convs: output pixel (i, j) sees only input pixel (i // s, j // s)."""
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(16, 8, scales=(scale,))
    x = torch.randn(1, 16, 3, 3, requires_grad=True)
    up = neck.rescale[0](x)
    s = int(scale)
    assert up.shape[-2:] == (3 * s, 3 * s) and up.shape[1] == 16 // s  # channels halve per transposed conv
    for i, j in [(0, 0), (4, 5), (3 * s - 1, 2)]:
        (grad,) = torch.autograd.grad(up[0, :, i, j].sum(), x, retain_graph=True)
        touched = grad.abs().sum(dim=(0, 1)).nonzero().tolist()
        assert touched == [[i // s, j // s]]


def test_multi_level_routes_each_input_to_its_own_output():
    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(16, 8)
    feats = [torch.randn(1, 16, 4, 4, requires_grad=True) for _ in range(4)]
    outs = neck(feats)
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    for k, out in enumerate(outs):
        grads = torch.autograd.grad(out.sum(), feats, retain_graph=True, allow_unused=True)
        assert [g is not None and g.abs().sum() > 0 for g in grads] == [i == k for i in range(4)]


def test_every_parameter_gets_a_gradient():
    neck = SimpleFeaturePyramid(16, 8)
    sum(o.square().sum() for o in neck([torch.randn(2, 16, 4, 4)])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="powers of two"):
        SimpleFeaturePyramid(8, 8, scales=(3.0,))
    with pytest.raises(ValueError, match="takes 1 or 4 feature maps, got 2"):
        SimpleFeaturePyramid(8, 8)([torch.randn(1, 8, 2, 2)] * 2)
    with pytest.raises(ValueError, match="fractional strides"):
        SimpleFeaturePyramid(8, 8, scales=(4.0,)).strides(6)
