"""Input sizes other than the checkpoint's: position tables interpolated at load, equal to independent computations;
sizes a backbone cannot take fail with both grids named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vpeft.backbones import build_backbone

from .test_checkpoints import tiny_clip, tiny_full_sam
from .tiny import SAM, SAMVIT, TINY, images, tiny


def bicubic_grid(table: torch.Tensor, size: int) -> torch.Tensor:
    """(1, H, W, C) -> (1, size, size, C), bicubic with antialiasing (the resampling timm and open_clip use)."""
    grid = table.permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False).permute(
        0, 2, 3, 1
    )


def test_sam_tables_are_interpolated_for_a_smaller_input(tmp_path):
    """64 px checkpoint (grid 8) into a 32 px encoder (grid 4): pos_embed 8x8 -> 4x4, global rel_pos 15 -> 7 rows."""
    sam = tiny_full_sam()
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    small = build_backbone("sam:vit_b", pretrained=str(tmp_path / "sam.pth"), **{**SAM, "img_size": 32})
    source = sam.image_encoder
    torch.testing.assert_close(small.model.pos_embed, bicubic_grid(source.pos_embed, 4), rtol=0, atol=1e-6)
    table = source.blocks[1].attn.rel_pos_h  # the global block: (2 * 8 - 1, head_dim)
    expected = F.interpolate(table.T[None], size=7, mode="linear", align_corners=False)[0].T
    assert small.model.blocks[1].attn.rel_pos_h.shape == (7, 32)
    torch.testing.assert_close(small.model.blocks[1].attn.rel_pos_h, expected, rtol=0, atol=1e-6)
    # the windowed block's table depends on the window (4), not the image: copied as is
    assert torch.equal(small.model.blocks[0].attn.rel_pos_w, source.blocks[0].attn.rel_pos_w)
    assert small(images("sam", size=32)).shape == (2, 32, 4, 4)


@torch.no_grad()
def test_resized_samvit_equals_timms_run_time_resampling(tmp_path):
    """timm's samvit resamples pos_embed and rel_pos on the fly for a smaller input; loading resized gives the same."""
    save_file(tiny("timm_samvit", seed=6).model.state_dict(), str(tmp_path / "samvit.safetensors"))
    path = str(tmp_path / "samvit.safetensors")
    large = build_backbone("samvit_base_patch16", pretrained=path, **SAMVIT).eval()
    small = build_backbone("samvit_base_patch16", pretrained=path, **{**SAMVIT, "img_size": 32}).eval()
    x = images("timm_samvit", size=32)
    torch.testing.assert_close(small(x), large(x), rtol=1e-5, atol=1e-5)


def test_open_clip_and_timm_vit_position_embeddings_are_resized(tmp_path):
    clip = tiny_clip()  # trained at 32 px: grid 4x4
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    tower = build_backbone("open_clip:ViT-B-16", pretrained=str(tmp_path / "clip.safetensors"), **CLIP64)
    table, resized = clip.visual.positional_embedding, tower.model.positional_embedding  # (1 + h*w, C)
    assert torch.equal(resized[0], table[0])  # the class token's entry
    expected = bicubic_grid(table[1:].reshape(1, 4, 4, -1), 8).reshape(64, -1)
    torch.testing.assert_close(resized[1:], expected, rtol=0, atol=1e-6)

    vit = tiny("timm_vit", seed=7)
    save_file(vit.model.state_dict(), str(tmp_path / "vit.safetensors"))
    large = build_backbone(TINY["timm_vit"][0], pretrained=str(tmp_path / "vit.safetensors"), **VIT64)
    table = vit.model.pos_embed  # (1, 1 + 16, C)
    assert torch.equal(large.model.pos_embed[:, :1], table[:, :1])
    expected = bicubic_grid(table[:, 1:].reshape(1, 4, 4, -1), 8).reshape(1, 64, -1)
    torch.testing.assert_close(large.model.pos_embed[:, 1:], expected, rtol=0, atol=1e-6)


CLIP64 = {**TINY["open_clip"][1], "img_size": 64}
VIT64 = {**TINY["timm_vit"][1], "img_size": 64}


def test_sizes_a_backbone_cannot_take():
    sam = tiny("sam")  # built for 64 px
    with pytest.raises(ValueError, match=r"input size 32x32 \(grid 4x4\) differs from the 64x64 \(grid 8x8\)"):
        sam(images("sam", size=32))
    with pytest.raises(ValueError, match=r"36x36 is not a multiple of the patch size 8.*e.g. 32x32"):
        sam.features(images("sam", size=36), [0])
    with pytest.raises(ValueError, match="img_size 60 is not a multiple of the patch size 8; use e.g. 56"):
        build_backbone("sam:vit_b", **{**SAM, "img_size": 60})


def test_a_grid_that_cannot_be_interpolated_names_both(tmp_path):
    wide = tiny("open_clip", img_size=(32, 64))  # grid 4x8: not square, open_clip's resize cannot take it
    save_file(wide.model.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"\(33, 64\) is not a class token plus a square grid.*model's grid 8x8"):
        build_backbone("open_clip:ViT-B-16", pretrained=str(tmp_path / "wide.safetensors"), **CLIP64)
    sam = tiny("sam", embed_dim=32)  # another width as well as another grid: no interpolation can fix that
    save_file(sam.model.state_dict(), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"e.g. \['pos_embed: file \(1, 8, 8, 32\), model \(1, 4, 4, 64\) "
        r"\(checkpoint grid 8x8, model grid 4x4",
    ):
        build_backbone("sam:vit_b", pretrained=str(tmp_path / "narrow.safetensors"), **{**SAM, "img_size": 32})
