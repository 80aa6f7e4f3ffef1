"""Segmentation heads: output shapes, the linear probe against a hand computation, what trains under a PEFT method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones import TimmBackbone
from vpeft.heads.segmentation import HEADS, build_segmentation_model, default_indices

from ..conftest import tiny_vit


@pytest.fixture
def backbone() -> TimmBackbone:
    return TimmBackbone(tiny_vit())  # depth 2, width 64, 8-pixel patches, 32x32 input


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("linear", {}),
        ("linear", {"indices": [0, 1]}),
        ("upernet", {"indices": [0, 1, 1, 1], "channels": 16, "neck_channels": 8}),
        ("upernet", {"indices": [-1], "channels": 16, "neck_channels": 8}),  # ViTDet: one map, four scales
    ],
)
def test_logits_cover_the_image(backbone, images, name, options):
    model = build_segmentation_model(backbone, 5, name, **options).eval()
    assert model(images).shape == (2, 5, 32, 32)
    assert model.get_classifier() is model.decoder


def test_linear_head_is_batchnorm_then_a_1x1_conv(backbone, images):
    model = build_segmentation_model(backbone, 3, "linear", indices=[1]).eval()
    head = model.decoder
    torch.nn.init.normal_(head.norm.running_mean)
    head.norm.running_var.uniform_(0.5, 2.0)
    features = backbone.features(images, [1])[0]  # (2, 64, 4, 4)
    normed = (features - head.norm.running_mean[:, None, None]) / torch.sqrt(
        head.norm.running_var[:, None, None] + head.norm.eps
    ) * head.norm.weight[:, None, None] + head.norm.bias[:, None, None]
    logits = torch.einsum("bchw,kc->bkhw", normed, head.classifier.weight[:, :, 0, 0])
    logits = logits + head.classifier.bias[:, None, None]
    expected = F.interpolate(logits, size=(32, 32), mode="bilinear")
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_default_indices_spread_over_the_depth():
    assert default_indices(12, 4) == [2, 5, 8, 11]
    assert default_indices(4, 4) == [0, 1, 2, 3]
    assert default_indices(12, 1) == [11]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradients_reach_only_the_decoder_and_the_adapter(backbone, images, name):
    options = {"channels": 8, "neck_channels": 8} if name == "upernet" else {}
    model = build_segmentation_model(backbone, 4, name, **options)
    report = vpeft.apply_method(model, "lora", r=2)
    assert report.head == sum(p.numel() for p in model.decoder.parameters() if p.requires_grad) > 0
    model.train()
    F.cross_entropy(model(images), torch.randint(0, 4, (2, 32, 32))).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora" in n) or n.startswith("decoder.") for n in trainable)
    assert any("lora" in n for n in trainable) and any(n.startswith("decoder.") for n in trainable)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_adapter_with_its_decoder_saves_and_loads(tmp_path, images):
    torch.manual_seed(0)
    model = build_segmentation_model(TimmBackbone(tiny_vit()), 3, "upernet", channels=8, neck_channels=8)
    vpeft.apply_method(model, "lora", r=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a "trained" adapter and decoder
    model.eval()
    vpeft.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(1)  # a fresh decoder with other random weights; the backbone is the same
    other = build_segmentation_model(TimmBackbone(tiny_vit()), 3, "upernet", channels=8, neck_channels=8).eval()
    assert not torch.allclose(other(images), model(images))
    vpeft.load_adapter(other, tmp_path / "adapter")
    torch.testing.assert_close(other.eval()(images), model(images))


def test_bad_head_options_are_named(backbone):
    with pytest.raises(ValueError, match=r"'linear' head takes \['indices', 'dropout'\]; \['channels'\]"):
        build_segmentation_model(backbone, 3, "linear", channels=4)
    with pytest.raises(ValueError, match=r"upernet takes 1 block or one per scale \(4"):
        build_segmentation_model(backbone, 3, "upernet", indices=[0, 1])
    with pytest.raises(KeyError, match="unknown segmentation head 'uper'.*'upernet'"):
        build_segmentation_model(backbone, 3, "uper")
    model = build_segmentation_model(backbone, 3, "linear", indices=[5])
    with pytest.raises(ValueError, match=r"feature indices \[5\]"):
        model(torch.zeros(1, 3, 32, 32))
