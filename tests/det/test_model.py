"""The ViTDet-style detector on a tiny random ViT: losses, detections, what the ViT sees, and what trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones import TimmBackbone
from vpeft.heads.detection import DetectionModel

from ..conftest import tiny_vit

# torchvision's documented loss names per detector
LOSSES = {
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
}
KEEP_ALL = {"faster_rcnn": {"box_score_thresh": 0.0}, "retinanet": {"score_thresh": 0.0}, "fcos": {"score_thresh": 0.0}}


def model_for(detector: str, **kwargs) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(TimmBackbone(tiny_vit(**kwargs)), 3, detector, out_channels=32, **KEEP_ALL[detector])


def batch():
    images = [torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0))]
    images.append(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)))
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0], [25.0, 5.0, 47.0, 17.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image with no object
    ]
    return images, targets


@pytest.mark.parametrize("detector", sorted(LOSSES))
def test_losses_in_training_and_detections_in_evaluation(detector):
    model = model_for(detector).train()
    losses = model(*batch())
    assert set(losses) == LOSSES[detector] and all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.detector.backbone.pyramid.output[0][0].weight.grad.abs().sum() > 0  # through the pyramid
    model.eval()
    image = batch()[0][0]  # 40 x 48: the detector scales it by 32 / 48 to 26 x 32 (interpolate floors 26.7)
    small = F.interpolate(image[None], scale_factor=32 / 48, mode="bilinear", recompute_scale_factor=True)[0]
    with torch.no_grad():
        found, found_small = model([image, small])
    assert len(found["boxes"]) > 0 and found["boxes"].shape == (len(found["scores"]), 4)
    boxes = found["boxes"]  # in the caller's pixels, not the ViT's
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 48 and boxes[:, 3].max() <= 40
    assert set(found["labels"].tolist()) <= {1, 2, 3}
    # the same ViT input, so the same detections, scaled back by width 48 / 32 and height 40 / 26
    assert small.shape == (3, 26, 32)
    scale = torch.tensor([48 / 32, 40 / 26, 48 / 32, 40 / 26])
    torch.testing.assert_close(found["boxes"][:5], found_small["boxes"][:5] * scale, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_vit_sees_the_normalised_image_padded_to_a_size_it_takes(dynamic):
    model = model_for("fcos", dynamic_img_size=dynamic).eval()
    seen = []
    model.backbone.model.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    image = torch.rand(3, 16, 32)  # long side 32 = the input size: no resize
    with torch.no_grad():
        model([image, image])  # two: FCOS's GroupNorm needs more than one value on the 1 x 1 top level
    config = model.backbone.data_config
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    # fixed-size ViT: padded to its 32 x 32 square; dynamic: to a multiple of the 8 px patch
    assert seen[0].shape == ((2, 3, 16, 32) if dynamic else (2, 3, 32, 32))
    torch.testing.assert_close(seen[0][0, :, :16], (image - mean) / std)
    assert not seen[0][0, :, 16:].any()
    seen.clear()
    with torch.no_grad():
        model([torch.rand(3, 64, 48)] * 2)  # long side scaled to 32: 32 x 24
    assert seen[0].shape == ((2, 3, 32, 24) if dynamic else (2, 3, 32, 32))


def test_the_head_module_holds_no_vit():
    model = model_for("faster_rcnn")
    head = model.get_classifier()
    backbone = {id(p) for p in model.backbone.parameters()}
    assert head is model.head and not backbone & {id(p) for p in head.parameters()}
    model.eval()(batch()[0])
    neck = head.detector.backbone
    assert neck._encoder is None  # lent for the call only
    copied = copy.deepcopy(head)
    assert sum(p.numel() for p in copied.parameters()) == sum(p.numel() for p in head.parameters())
    with pytest.raises(RuntimeError, match="encoder=vit"):
        neck(torch.zeros(1, 3, 32, 32))


def test_lora_trains_only_the_adapter_and_the_head():
    model = model_for("faster_rcnn")
    report = vpeft.apply_method(model, "lora")
    assert report.head == sum(p.numel() for p in model.head.base_layer.parameters())
    model.train()
    sum(model(*batch()).values()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if n.startswith("backbone.model.blocks.") and ".lora_" in n}
    head = {n for n in trainable if n.startswith("head.adapters.")}  # the adapter's copy of pyramid + detector
    assert lora and head and trainable == lora | head
    assert len(lora) == 2 * 2 * 2  # 2 blocks x (q, v) x (A, B)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable
    # B starts at zero, so only B's gradient is non-zero in the first step: the loss reaches the ViT's adapters
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if n.endswith("lora_B"))


def test_head_options_are_checked():
    backbone = TimmBackbone(tiny_vit())
    with pytest.raises(ValueError, match="'retina' is not a detector. Did you mean 'retinanet'"):
        DetectionModel(backbone, 3, "retina")
    with pytest.raises(ValueError, match="box_score_tresh is not an option of faster_rcnn. Did you mean box_score_th"):
        DetectionModel(backbone, 3, "faster_rcnn", box_score_tresh=0.1)
    with pytest.raises(ValueError, match="min_size is set by vpeft from the backbone"):
        DetectionModel(backbone, 3, "fcos", min_size=64)


def test_a_saved_adapter_reloads_into_a_fresh_model(tmp_path):
    model = model_for("fcos").eval()
    vpeft.apply_method(model, "lora")
    with torch.no_grad():  # move the adapter and the head copy away from their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        expected = model(batch()[0])
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = model_for("fcos").eval()
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        found = fresh(batch()[0])
    for a, b in zip(expected, found, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
