"""Checkpoints in each official layout, written by the test and loaded back bit for bit.

timm (.safetensors; .pth with DDP ``module.``, ``torch.compile`` ``_orig_mod.`` and ``state_dict`` nesting), the
official full-SAM state dict (``image_encoder.``/``prompt_encoder.``/``mask_decoder.``) into segment_anything and timm's
samvit, MedSAM's training checkpoint ``{"model": ..., "optimizer": ..., "epoch": ...}``, and open_clip's full CLIP dict
(``visual.`` plus the text tower) or the image tower alone.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from vpeft.backbones import build_backbone, load_pretrained

from .tiny import SAM, SAMVIT, TINY, images, tiny


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


def test_timm_safetensors_and_wrapped_pth_load_exactly(tmp_path):
    source = tiny("timm_vit", seed=1)
    weights = source.model.state_dict()
    head = {"head.weight": torch.randn(5, 64), "head.bias": torch.randn(5)}  # a classifier a backbone has no use for
    save_file({**weights, **head}, str(tmp_path / "vit.safetensors"))
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in weights.items()}, "epoch": 7}
    torch.save(wrapped, tmp_path / "ddp.pth")
    for file in ("vit.safetensors", "ddp.pth"):
        target = build_backbone(TINY["timm_vit"][0], pretrained=str(tmp_path / file), **TINY["timm_vit"][1])
        assert_same_weights(target.model, weights)
    x = images("timm_vit")
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source(x), rtol=0, atol=0)


def tiny_full_sam(seed: int = 3) -> torch.nn.Module:
    """A segment_anything ``Sam`` (image encoder, prompt encoder, mask decoder) at tiny sizes: the official layout."""
    sa = pytest.importorskip("segment_anything")
    m = sa.modeling
    torch.manual_seed(seed)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)  # as segment_anything's _build_sam
    encoder = m.ImageEncoderViT(use_rel_pos=True, qkv_bias=True, norm_layer=norm, **SAM)
    grid = SAM["img_size"] // SAM["patch_size"]
    prompt = m.PromptEncoder(
        embed_dim=32, image_embedding_size=(grid, grid), input_image_size=(64, 64), mask_in_chans=4
    )
    decoder = m.MaskDecoder(
        transformer_dim=32,
        transformer=m.TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
        iou_head_hidden_dim=16,
    )
    sam = m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.5)
    return sam.eval()


def test_official_sam_checkpoint_loads_into_segment_anything_and_timm_samvit(tmp_path):
    sam = tiny_full_sam()
    torch.save(sam.state_dict(), tmp_path / "sam_vit_b.pth")
    encoder = {k[len("image_encoder.") :]: v for k, v in sam.state_dict().items() if k.startswith("image_encoder.")}

    ours = build_backbone("sam:vit_b", pretrained=str(tmp_path / "sam_vit_b.pth"), **SAM).eval()
    assert_same_weights(ours.model, encoder)
    samvit = build_backbone("samvit_base_patch16", pretrained=str(tmp_path / "sam_vit_b.pth"), **SAMVIT).eval()
    renamed = {k.replace("mlp.lin", "mlp.fc"): v for k, v in encoder.items()}  # timm's names for SAM's MLP
    assert_same_weights(samvit.model, renamed)

    x = images("sam")
    with torch.no_grad():
        expected = sam.image_encoder(x)  # the official encoder
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(samvit(x), expected, rtol=1e-4, atol=1e-4)  # timm's fused attention


def test_medsam_training_checkpoint_loads(tmp_path):
    sam = tiny_full_sam(seed=4)
    state = {f"module.{k}": v for k, v in sam.state_dict().items()}  # saved from DDP
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 99}, tmp_path / "medsam.pth")
    ours = build_backbone("sam:vit_b", pretrained=str(tmp_path / "medsam.pth"), **SAM)
    assert torch.equal(ours.model.blocks[1].attn.rel_pos_h, sam.image_encoder.blocks[1].attn.rel_pos_h)
    assert torch.equal(ours.model.neck[0].weight, sam.image_encoder.neck[0].weight)


def tiny_clip(seed: int = 5) -> torch.nn.Module:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    text = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def test_open_clip_full_and_visual_only_checkpoints_load(tmp_path):
    clip = tiny_clip()
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    torch.save(clip.visual.state_dict(), tmp_path / "visual.pth")
    expected = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
    x = images("open_clip")
    for file in ("clip.safetensors", "visual.pth"):
        tower = build_backbone("open_clip:ViT-B-16", pretrained=str(tmp_path / file), **TINY["open_clip"][1]).eval()
        assert_same_weights(tower.model, expected)
        with torch.no_grad():  # the class token after ln_post, projected, is CLIP's image embedding
            embedding = tower.pool(tower(x), "token") @ clip.visual.proj
            torch.testing.assert_close(embedding, clip.encode_image(x), rtol=1e-5, atol=1e-5)


def test_npz_needs_a_timm_vision_transformer(tmp_path):
    (tmp_path / "ViT-B_16.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.npz checkpoints need a timm VisionTransformer, got ImageEncoderViT"):
        load_pretrained(tiny("sam"), tmp_path / "ViT-B_16.npz")


@torch.no_grad()
def test_one_clip_file_serves_timms_clip_tower_and_open_clips(tmp_path):
    """timm converts the ``visual.`` part of an OpenAI/open_clip state dict: both towers give the same tokens."""
    clip = tiny_clip()
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    path = str(tmp_path / "clip.safetensors")
    timm_tower = build_backbone("vit_base_patch16_clip_224.openai", pretrained=path, **TINY["timm_vit"][1]).eval()
    open_clip_tower = build_backbone("open_clip:ViT-B-16", pretrained=path, **TINY["open_clip"][1]).eval()
    x = images("open_clip")
    torch.testing.assert_close(timm_tower(x), open_clip_tower(x), rtol=1e-5, atol=1e-5)
