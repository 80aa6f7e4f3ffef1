"""Earth-Adapter: FFT low/high split of the token grid, per-token router over three experts, after every block."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.methods.earth_adapter import frequency_split, low_pass_mask

from ._vit_reference import perturb, reference_forward


def _non_square_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=(32, 48), patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10
    ).eval()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def _layer(model, i):
    return model.blocks[i].adapters["default"]["all"]


def _box(n: int, ratio: float) -> torch.Tensor:
    """Signed frequencies kept by the official box [n//2 - c, n//2 + c) of the shifted spectrum: -c <= k < c."""
    k = torch.round(torch.fft.fftfreq(n) * n)
    c = max(1, int(n * ratio // 2))
    return ((k >= -c) & (k < c)).float()


def _split(x, ratio):
    """Low/high parts computed on the unshifted spectrum with a mask built from signed frequencies (no fftshift)."""
    h, w = x.shape[-2:]
    mask = _box(h, ratio)[:, None] * _box(w, ratio)[None, :]
    spec = torch.fft.fft2(x)
    return torch.fft.ifft2(spec * mask).real, torch.fft.ifft2(spec * (1 - mask)).real


@pytest.mark.parametrize("shape", [(4, 6), (7, 5), (32, 32)])
def test_frequency_split_adds_back_and_matches_independent_fft(shape):
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    low, high = frequency_split(x, low_pass_mask(*shape, 0.3))
    torch.testing.assert_close(low + high, x, rtol=0, atol=1e-5)
    ref_low, ref_high = _split(x, 0.3)
    torch.testing.assert_close(low, ref_low, rtol=0, atol=1e-5)
    torch.testing.assert_close(high, ref_high, rtol=0, atol=1e-5)
    assert high.abs().max() > 1e-3 and low.abs().max() > 1e-3
    const = torch.full((1, 1, *shape), 2.5)  # only the zero frequency: all low
    c_low, c_high = frequency_split(const, low_pass_mask(*shape, 0.3))
    torch.testing.assert_close(c_low, const, rtol=0, atol=1e-5)
    assert c_high.abs().max() < 1e-5


def test_official_box_sizes():
    assert low_pass_mask(32, 32, 0.3).sum() == 8 * 8  # c = 4
    assert low_pass_mask(32, 32, 0.2).sum() == 6 * 6  # c = 3
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0  # Nyquist: all high
    low, high = frequency_split(checker[None, None], low_pass_mask(32, 32, 0.3))
    assert low.abs().max() < 1e-5
    torch.testing.assert_close(high[0, 0], checker, rtol=0, atol=1e-5)


def test_non_square_box_has_a_half_width_per_axis():
    mask = low_pass_mask(8, 20, 0.3)  # c_H = int(2.4 // 2) = 1 rows each side of 4, c_W = int(6.0 // 2) = 3 of 10
    expected = torch.zeros(8, 20)
    expected[3:5, 7:13] = 1.0
    assert torch.equal(mask, expected)


def _expert(seq, u):
    return F.linear(F.relu(F.linear(u, seq[0].weight, seq[0].bias)), seq[2].weight, seq[2].bias)


def _reference(base, model, images, grid, adapt_prefix=True):
    h, w = grid

    def block(i, blk, x):
        a = _layer(model, i)
        y = blk(x)
        cls, f = y[:, :1], y[:, 1:]
        d = _expert(a.expert1, f)
        if a.frequency:
            low, high = _split(f.transpose(1, 2).reshape(f.shape[0], -1, h, w), a_ratio)
            low, high = (t.flatten(2).transpose(1, 2) for t in (low, high))
            g = torch.softmax(f @ a.router.weight.T + a.router.bias, dim=-1)
            d = g[..., 0:1] * d + g[..., 1:2] * _expert(a.expert2, low) + g[..., 2:3] * _expert(a.expert3, high)
        cls = cls + a.scale * _expert(a.expert1, cls) if adapt_prefix else cls
        return torch.cat([cls, f + a.scale * d], dim=1)

    a_ratio = 0.3
    return reference_forward(base, images, block)


@pytest.mark.parametrize("adapt_prefix", [True, False])
def test_non_square_grid_forward_save_load_disable(tmp_path, adapt_prefix):
    base = _non_square_vit()
    images = _images()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "earth_adapter", dim=8, fft_layers=(0, -1), adapt_prefix=adapt_prefix)
    config = vpeft.core.adapter_record(model, "default").config
    assert config.grid == (4, 6) and config.num_prefix_tokens == 1 and config.fft_layers == (0, 1)
    assert _layer(model, 0).frequency and _layer(model, 1).frequency
    with torch.no_grad():
        torch.testing.assert_close(
            model(images), _reference(base, model, images, (4, 6), adapt_prefix), rtol=1e-5, atol=1e-5
        )
        perturb(model)
        out = model(images)
        torch.testing.assert_close(out, _reference(base, model, images, (4, 6), adapt_prefix), rtol=1e-5, atol=1e-5)
        with vpeft.disabled(model):
            torch.testing.assert_close(model(images), base(images), rtol=0, atol=0)
        vpeft.save_adapter(model, tmp_path / "a")
        fresh = copy.deepcopy(base)
        vpeft.load_adapter(fresh, tmp_path / "a")
        torch.testing.assert_close(fresh(images), out, rtol=0, atol=0)
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("adapted", i), out))
        blk.base_layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("base", i), out))
    with torch.no_grad():
        model(images)
    for i in range(2):
        same = torch.equal(seen[("adapted", i)][:, :1], seen[("base", i)][:, :1])
        assert same != adapt_prefix  # the class token leaves the FFT and router; it takes E1 or stays as it was
        assert not torch.allclose(seen[("adapted", i)][:, 1:], seen[("base", i)][:, 1:])


def test_only_first_quarter_is_frequency_by_default_and_plain_blocks_skip_fft(images):
    from ..conftest import tiny_vit

    model = tiny_vit()
    vpeft.apply_method(model, "earth_adapter")
    assert [_layer(model, i).frequency for i in range(2)] == [True, False]
    assert not hasattr(_layer(model, 1), "router")
    assert _layer(model, 0).scale.item() == pytest.approx(0.1)


def test_vit_b16_count_follows_the_formula(vit_b16):
    C, d, L = 768, 64, 12
    E = 2 * C * d + d + C
    for fft_layers, F_ in [(None, 3), ((-6, -5, -4, -3, -2, -1), 6)]:
        model = copy.deepcopy(vit_b16)
        options = {} if fft_layers is None else {"fft_layers": fft_layers}
        report = vpeft.apply_method(model, "earth_adapter", **options)
        assert report.trainable == L * E + F_ * (2 * E + 3 * C + 3) + L
    assert 12 * 99_136 + 3 * (2 * 99_136 + 2_307) + 12 == 1_791_381


def test_grid_must_come_from_model_or_options():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([timm.models.vision_transformer.Block(16, 2)])

        def forward(self, x):
            return self.blocks[0](x)

    with pytest.raises(ValueError, match="grid"):
        vpeft.apply_method(Bare(), "earth_adapter", head=())
    model = Bare()
    vpeft.apply_method(model, "earth_adapter", head=(), grid=(2, 3), num_prefix_tokens=0)
    assert model(torch.randn(1, 6, 16)).shape == (1, 6, 16)
    with pytest.raises(ValueError, match="block outputs"):
        model(torch.randn(1, 7, 16))
    with pytest.raises(ValueError, match="fft_layers"):
        vpeft.apply_method(Bare(), "earth_adapter", head=(), grid=(2, 3), num_prefix_tokens=0, fft_layers=(1,))


def test_grid_is_read_from_the_vit_inside_a_segmentation_model(images):
    from vpeft.backbones import TimmBackbone
    from vpeft.heads.segmentation import build_segmentation_model

    from ..conftest import tiny_vit

    model = build_segmentation_model(TimmBackbone(tiny_vit()), 3, "linear", indices=[-1])
    vpeft.apply_method(model, "earth_adapter")  # the grid and prefix of backbone.model, found inside the task model
    assert model(images).shape == (2, 3, 32, 32)
    layers = [m for m in model.modules() if type(m).__name__ == "EarthAdapter"]
    assert layers and all(layer.grid == (4, 4) and layer.prefix == 1 for layer in layers)
