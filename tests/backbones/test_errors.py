"""Bad input gets a clear error: unknown names with close matches, hub tags (nothing is downloaded), checkpoints
whose keys do not fit (counts and examples; ``strict=False`` only on request), unknown builder options."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from vpeft.backbones import build_backbone, load_pretrained

from .tiny import CLIP, SAM, TINY, VIT, tiny


@pytest.mark.parametrize(
    "name, message",
    [
        ("vit_tiny_patch16_2244", r"unknown timm backbone 'vit_tiny_patch16_2244'.*'vit_tiny_patch16_224'"),
        ("open_clip:ViT-B-61", r"unknown open_clip model 'ViT-B-61'.*'ViT-B-16'"),
        ("sam:vit_x", r"unknown SAM image encoder size 'vit_x'.*Valid names: vit_b, vit_h, vit_l"),
        ("openclip:ViT-B-16", r"unknown backbone family 'openclip'. Did you mean 'open_clip'"),
    ],
)
def test_unknown_names_list_close_matches(name, message):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
    with pytest.raises((ValueError, KeyError), match=message):
        build_backbone(name)


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_base_patch16_224.augreg_in21k", "timm/vit_base_patch16_224"])
def test_hub_names_and_tags_are_refused_without_downloading(name, tmp_path):
    with pytest.raises(ValueError, match=r"never downloads.*local path \(.safetensors, .pth or .npz\)"):
        build_backbone(name)
    with pytest.raises(ValueError, match=r"model.pretrained '.*' names weights on a hub; vpeft never downloads"):
        build_backbone(TINY["timm_vit"][0], pretrained=name, **VIT)
    with pytest.raises(FileNotFoundError, match="does not exist. Give the path of a local checkpoint file"):
        build_backbone(TINY["timm_vit"][0], pretrained=str(tmp_path / "missing.safetensors"), **VIT)


def test_keys_that_do_not_fit_are_counted_with_examples(tmp_path, caplog):
    deeper = tiny("timm_vit", depth=3)
    state = {**deeper.model.state_dict(), "extra.weight": torch.zeros(2)}
    del state["norm.weight"]
    save_file(state, str(tmp_path / "deeper.safetensors"))
    target = tiny("timm_vit", seed=9)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['norm.weight'\]\), 13 unexpected \(e.g. \['blocks.2."):
        load_pretrained(target, tmp_path / "deeper.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in target.model.state_dict().items())  # nothing half-loaded

    with caplog.at_level(logging.WARNING, logger="vpeft"):  # only on explicit request: a partial load
        load_pretrained(target, tmp_path / "deeper.safetensors", strict=False)
    assert "1 missing" in caplog.text and "strict=False" in caplog.text
    assert torch.equal(target.model.blocks[1].attn.qkv.weight, deeper.model.blocks[1].attn.qkv.weight)
    assert torch.equal(target.model.norm.weight, before["norm.weight"])


def test_unknown_builder_options_are_named():
    with pytest.raises(ValueError, match=r"SAM image encoder options \['depht'\] do not exist"):
        build_backbone("sam:vit_b", depht=2)
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match=r"open_clip vision options \['layer'\] do not exist"):
        build_backbone("open_clip:ViT-B-16", **{**CLIP, "layer": 2})
    with pytest.raises(ValueError, match="no stochastic depth"):
        build_backbone("sam:vit_b", drop_path=0.1, **SAM)


def test_a_full_sam_with_another_encoder_size_is_refused(tmp_path):
    small = tiny("sam", embed_dim=32)
    torch.save({f"image_encoder.{k}": v for k, v in small.model.state_dict().items()}, tmp_path / "sam.pth")
    with pytest.raises(ValueError, match=r"does not fit ImageEncoderViT: 0 missing.*with other shapes"):
        build_backbone("sam:vit_b", pretrained=str(tmp_path / "sam.pth"), **SAM)
