"""One interface over timm ViT, timm samvit, segment_anything and open_clip: features, forward, pool, checkpointing,
normalisation, and PEFT methods applied through the core."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft

from .tiny import TINY, TOKEN_FAMILIES, images, reference_features, tiny

FAMILIES = list(TINY)


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_features_equal_the_library_block_outputs(name):
    backbone, x = tiny(name), images(name)
    h, w = backbone.grid(tuple(x.shape[-2:]))
    assert (h, w) == (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
    indices = [0, -1, 1]
    got = backbone.features(x, indices)
    assert [f.shape for f in got] == [(2, backbone.embed_dim, h, w)] * 3
    first, last = reference_features(name, backbone, x, [0, 1])
    for a, b in zip(got, [first, last, last], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert backbone.depth == 2
    with pytest.raises(ValueError, match=r"do not fit a backbone with 2 blocks"):
        backbone.features(x, [2])


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_forward_shape_and_pools(name):
    backbone, x = tiny(name), images(name)
    out = backbone(x)
    h, w = backbone.grid(tuple(x.shape[-2:]))
    if name in TOKEN_FAMILIES:  # class token, then the h * w patch tokens
        assert out.shape == (2, backbone.num_prefix_tokens + h * w, backbone.out_dim)
        torch.testing.assert_close(backbone.pool(out, "token"), out[:, 0])
        torch.testing.assert_close(backbone.pool(out, "avg"), out[:, 1:].mean(1))
        assert torch.equal(backbone.pool(out, "both"), torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1))
    else:  # SAM runs its neck: (B, out_chans, h, w)
        assert out.shape == (2, backbone.out_dim, h, w) and backbone.out_dim == 32 != backbone.embed_dim
        torch.testing.assert_close(backbone.pool(out, "avg"), out.flatten(2).mean(-1))
        with pytest.raises(ValueError, match="no class token; use pool='avg'"):
            backbone.pool(out, "token")


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_keeps_outputs_and_gradients(name):
    plain, x = tiny(name).train(), images(name)
    checked = copy.deepcopy(plain)
    checked.set_grad_checkpointing(True)
    out_plain, out_checked = plain(x), checked(x)
    torch.testing.assert_close(out_checked, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_checked.square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)
    features = checked.features(x, [0, 1])
    assert [f.shape[1] for f in features] == [checked.embed_dim] * 2


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # Radford et al. 2021


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vit_tiny_patch16_224.augreg_in21k", ((0.5,) * 3, (0.5,) * 3)),  # big_vision's AugReg weights
        ("vit_base_patch16_clip_224.openai", OPENAI_CLIP),
        ("vit_small_patch14_dinov2.lvd142m", IMAGENET),
        ("samvit_base_patch16", IMAGENET),  # SAM's pixel_mean/std are ImageNet's, in 0..255
        ("sam:vit_b", IMAGENET),
        ("open_clip:ViT-B-16", OPENAI_CLIP),
    ],
)
def test_data_config_follows_the_pretrained_normalisation(name, expected):
    options = dict(TINY["open_clip"][1]) if name.startswith("open_clip") else {**TINY["timm_vit"][1], "img_size": 64}
    if name.startswith(("sam", "samvit")):
        options = dict(TINY["sam"][1] if name.startswith("sam:") else TINY["timm_samvit"][1])
    if name.startswith(("sam:", "open_clip:")):
        pytest.importorskip("segment_anything" if name.startswith("sam:") else "open_clip")
    config = vpeft.backbones.build_backbone(name, **options).data_config
    assert config["mean"] == pytest.approx(expected[0], abs=1e-6)
    assert config["std"] == pytest.approx(expected[1], abs=1e-6)
    assert config["input_size"] == (3, options["img_size"], options["img_size"])


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_lora_applies_through_the_core_and_features_still_come_out(name):
    base, x = tiny(name), images(name)
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "lora", r=4)
    rows = {row[0] for row in report.rows}
    attention = "model.transformer.resblocks.{}.attn" if name == "open_clip" else "model.blocks.{}.attn.qkv"
    assert rows == {f"{attention.format(i)}[{p}]" for i in range(2) for p in ("q", "v")}
    assert report.trainable == 2 * 2 * 4 * (64 + 64)
    torch.testing.assert_close(model.features(x, [1])[0], base.features(x, [1])[0])  # B = 0 at init
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            p.normal_(0, 0.1)
    changed = model.features(x, [1])[0]
    assert changed.shape == base.features(x, [1])[0].shape
    assert not torch.allclose(changed, base.features(x, [1])[0], atol=1e-4)


@pytest.mark.parametrize("name", TOKEN_FAMILIES)
def test_vpt_deep_prompts_reach_the_features(name):
    backbone, x = tiny(name), images(name)
    base = copy.deepcopy(backbone)
    vpeft.apply_method(backbone, "vpt_deep", num_prompts=3, patch_size=8, dropout=0.0)
    tokens = backbone(x)
    assert tokens.shape == base(x).shape  # the last block strips the prompts again
    features = backbone.features(x, [0, 1])
    assert [f.shape for f in features] == [base.features(x, [0])[0].shape] * 2
    assert not torch.allclose(features[1], base.features(x, [1])[0], atol=1e-4)
    features[1].sum().backward()
    assert all(p.grad is not None for n, p in backbone.named_parameters() if p.requires_grad)


@torch.no_grad()
def test_open_clip_lora_leaves_the_key_projection_untouched():
    """LoRA on the q and v slices of nn.MultiheadAttention's in_proj: merging changes q and v rows only."""
    base, x = tiny("open_clip"), images("open_clip")
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "lora", r=4)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            p.normal_(0, 0.1)
    adapted = model(x)
    assert not torch.allclose(adapted, base(x), atol=1e-4)
    vpeft.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    for i in range(2):
        before = base.model.transformer.resblocks[i].attn.in_proj_weight.chunk(3)
        after = model.model.transformer.resblocks[i].attn.in_proj_weight.chunk(3)
        assert torch.equal(after[1], before[1])  # k
        assert not torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])  # q, v


def test_sam_encoder_gets_lora_on_its_mlp_by_role():
    """segment_anything names its MLP ``mlp.lin1``/``mlp.lin2``; the roles mlp_in/mlp_out find them."""
    model = tiny("sam")
    report = vpeft.apply_method(model, "lora", r=2, targets=("mlp_in", "mlp_out"))
    assert {row[0] for row in report.rows} == {f"model.blocks.{i}.mlp.lin{j}" for i in range(2) for j in (1, 2)}


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("deit_tiny_distilled_patch16_224", 2),  # class and distillation tokens
        ("vit_small_patch14_reg4_dinov2", 5),  # class token and four registers
        ("eva02_tiny_patch14_224", 1),
        ("vit_base_patch16_clip_224", 1),
    ],
)
@torch.no_grad()
def test_timm_vit_families_skip_their_prefix_tokens(name, prefix):
    backbone = vpeft.backbones.build_backbone(name, **TINY["timm_vit"][1]).eval()
    x = images("timm_vit")
    assert backbone.num_prefix_tokens == prefix
    assert backbone(x).shape == (2, prefix + 16, 64)
    expected = backbone.model.forward_intermediates(x, indices=[1], norm=False, intermediates_only=True)
    torch.testing.assert_close(backbone.features(x, [1])[0], expected[0], rtol=1e-5, atol=1e-5)
