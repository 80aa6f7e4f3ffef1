"""Target selection: patterns, roles, slices, types, block indices, excludes, heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import name_matches

from .conftest import tiny_vit


def targets(model: nn.Module, method: str = "lora", **options) -> list[str]:
    return [row[0] for row in vpeft.apply_method(model, method, **options).rows]


@pytest.mark.parametrize(
    "path, pattern, expected",
    [
        ("blocks.3.attn.qkv", "attn.qkv", True),  # dotted suffix
        ("blocks.3.attn.qkv", "qkv", True),
        ("blocks.3.attn.qkv", "tn.qkv", False),  # suffixes stop at dots
        ("blocks.3.attn.qkv", r"blocks\.[0-3]\.attn\.qkv", True),  # full-match regex
        ("blocks.13.attn.qkv", r"blocks\.1\.attn\.qkv", False),
        ("blocks.3.attn.qkv", r"attn\.qkv", False),  # a regex must match the whole path
    ],
)
def test_name_matching(path, pattern, expected):
    assert name_matches(path, pattern) is expected


def test_default_lora_targets_are_q_and_v_slices_of_every_block():
    assert targets(tiny_vit()) == [f"blocks.{i}.attn.qkv[{p}]" for i in range(2) for p in "qv"]


def test_regex_layers_and_exclude():
    model = tiny_vit()
    assert targets(model, targets=[r"blocks\.\d+\.mlp\.fc\d"], exclude=["blocks.1.mlp.fc2"]) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
    ]
    assert targets(tiny_vit(), targets=["attn.proj", "mlp.fc2"], layers=[1]) == [
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc2",
    ]


def test_exclude_wins_over_slices():
    assert targets(tiny_vit(), targets=["attn.qkv[q,k,v]"], exclude=["attn.qkv[k]"]) == [
        f"blocks.{i}.attn.qkv[{p}]" for i in range(2) for p in "qv"
    ]


def test_select_by_type_intersects_with_names():
    assert targets(tiny_vit(), target_types=["Linear"], targets=[r"blocks\.0\..*"]) == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    everything = targets(tiny_vit(), target_types=["Linear"], targets=[])
    assert "head" not in everything and len(everything) == 8  # the head is never a target


def test_head_detected_and_shown_apart():
    report = vpeft.apply_method(tiny_vit(), "lora")
    assert [h for h, _ in report.heads] == ["head"] and report.head == 64 * 10 + 10
    assert "head" in str(report) and f"{report.trainable:,}" in str(report)


def test_no_head_when_asked():
    model = tiny_vit()
    report = vpeft.apply_method(model, "lora", head=[])
    assert report.head == 0 and not model.head.weight.requires_grad


def test_open_clip_style_multihead_attention_roles():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = nn.Sequential(Block(), Block())
    assert targets(model, head=[]) == ["0.attn[q]", "0.attn[v]", "1.attn[q]", "1.attn[v]"]
    model = nn.Sequential(Block())
    assert targets(model, targets=["attn_out"], head=[]) == ["0.attn[out_proj]"]


def test_fused_qkv_k_output_bit_identical():
    base, model = tiny_vit(), tiny_vit()
    vpeft.apply_method(model, "lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(2, 17, 64)
    y_base, y = base.blocks[0].attn.qkv(x), model.blocks[0].attn.qkv(x)
    q, k, v = y.chunk(3, dim=-1)
    q0, k0, v0 = y_base.chunk(3, dim=-1)
    assert torch.equal(k, k0)
    assert not torch.allclose(q, q0) and not torch.allclose(v, v0)
