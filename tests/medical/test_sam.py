"""Prompt generation from masks and the SAM / UNETR heads on tiny encoders."""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft.backbones import build_backbone
from vpeft.heads.sam import ABSENT, SamHead, SamPrompts, masks_to_prompts
from vpeft.heads.unetr import UnetrDecoder
from vpeft.medical.model import MedicalSegmenter, embedding_channels


def _labels() -> torch.Tensor:
    labels = torch.zeros(2, 20, 30, dtype=torch.long)  # (B, H, W): rows 0..19, columns 0..29
    labels[0, 2:6, 10:25] = 1  # wide and short: x (columns) 10..24, y (rows) 2..5
    labels[0, 12:18, 3:5] = 2
    labels[1, 5:15, 0:3] = 2  # class 1 absent from image 1
    return labels


def test_points_inside_their_class_in_x_y_order():
    labels = _labels()
    p = masks_to_prompts(labels, 3, positive=5, negative=3, generator=torch.Generator().manual_seed(0))
    assert p.points.shape == (2, 2, 8, 2) and p.point_labels.shape == (2, 2, 8)
    assert p.present.tolist() == [[True, True], [False, True]]
    for b in range(2):
        for c in range(2):
            if not p.present[b, c]:
                continue
            for (x, y), lab in zip(p.points[b, c].long().tolist(), p.point_labels[b, c].tolist(), strict=True):
                inside = labels[b, y, x].item() == c + 1  # row y, column x
                assert inside == (lab == 1), f"point (x={x}, y={y}) with label {lab}"
    # class 1 of image 0 spans 15 columns and 4 rows: x varies more than y only if (x, y) is the order
    xs, ys = p.points[0, 0, :5, 0], p.points[0, 0, :5, 1]
    assert xs.min() >= 10 and xs.max() <= 24 and ys.min() >= 2 and ys.max() <= 5


def test_boxes_are_mask_extents():
    p = masks_to_prompts(_labels(), 3)
    assert p.boxes[0, 0].tolist() == [10, 2, 24, 5]  # (x_min, y_min, x_max, y_max), inclusive
    assert p.boxes[0, 1].tolist() == [3, 12, 4, 17]
    assert p.boxes[1, 1].tolist() == [0, 5, 2, 14]


def test_prompts_seeded():
    draw = lambda seed: masks_to_prompts(_labels(), 3, 3, 2, 0.1, torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a.points, b.points) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.points, c.points)
    jittered = masks_to_prompts(_labels(), 3, jitter=0.2, generator=torch.Generator().manual_seed(3))
    assert (jittered.boxes[0, 0] - torch.tensor([10.0, 2, 24, 5])).abs().max() <= 0.2 * 15 + 0.5


def _tiny_sam():
    return build_backbone(
        "sam:vit_b", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        global_attn_indexes=(1,), window_size=2, out_chans=16,
    )  # fmt: skip


@pytest.mark.parametrize("prompt", ["box", "points", "box+points", "none"])
def test_sam_head_shapes_on_a_tiny_sam_encoder(prompt):
    torch.manual_seed(0)
    backbone = _tiny_sam()
    head = SamHead(embedding_channels(backbone), (32, 32), 3, prompt, 16, 1, 2, 32, sam_neck=False)
    prompter = SamPrompts(16, backbone.grid((32, 32)), (32, 32), prompt)
    model = MedicalSegmenter(backbone, head, "sam", 1, prompter=prompter)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 4:12, 6:20] = 1
    labels[0, 20:30, 20:30] = 2
    prompts = None if prompt == "none" else masks_to_prompts(labels, 3, 2, 1, generator=torch.Generator())
    logits = model(torch.rand(2, 1, 32, 32), prompts)
    assert logits.shape == (2, 3, 32, 32)
    if prompt != "none":
        assert (logits[:, 0] == 0).all()  # background's fixed logit
        assert (logits[1, 2] == ABSENT).all()  # class 2 has no prompt in image 1
    # PEFT: LoRA on the encoder, the head (neck + decoder) trained in full, the prompt encoder frozen
    vpeft.apply_method(model, "lora", r=2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "head"}
    model(torch.rand(2, 1, 32, 32), prompts).sum().backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert silent == []


def test_decoder_adapted_with_the_method_targets():
    backbone = _tiny_sam()
    head = SamHead(embedding_channels(backbone), (32, 32), 3, "none", 16, 1, 2, 32, sam_neck=False)
    model = MedicalSegmenter(backbone, head, "sam", 1, prompter=SamPrompts(16, (4, 4), (32, 32), "none"))
    pattern = r"head\.decoder\.transformer\.layers\.\d+\.self_attn\.(q|v)_proj"
    report = vpeft.apply_method(model, "lora", r=2, targets=[pattern], head=["head.decoder.output_upscaling"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("self_attn.q_proj" in n and "lora" in n for n in names)
    assert not any(n.startswith("backbone") for n in names)  # the encoder stays frozen
    assert report.trainable > 0


def test_unetr_shapes_2d_and_slice_folded_3d():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    head2d = UnetrDecoder(2, 3, 32, 8, 4, feature_size=4)
    model = MedicalSegmenter(backbone, head2d, "unetr", 1, indices=[0, 1, 2])
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4, 32, 32)
    head3d = UnetrDecoder(3, 3, 32, 8, 4, feature_size=4, up=(2, 1, 2))
    model3d = MedicalSegmenter(backbone, head3d, "unetr", 1, indices=[0, 1, 2], spatial_dims=3, axis=1)
    assert model3d(torch.rand(1, 1, 32, 5, 32)).shape == (1, 4, 32, 5, 32)  # 5 slices along axis 1
    with pytest.raises(ValueError, match="power-of-two patch size"):
        UnetrDecoder(2, 3, 32, 12, 4)
    with pytest.raises(ValueError, match="the data has 4 channels"):
        MedicalSegmenter(backbone, head2d, "unetr", 4, indices=[0, 1, 2])
