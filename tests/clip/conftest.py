"""A tiny random-weight CLIP (both open_clip towers) built from a JSON model config, as the CLIP task builds one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from vpeft.backbones.open_clip import build_clip_model, clip_tokenizer  # noqa: E402
from vpeft.tasks.clip import ClipClassifier, tokenize_prompts  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
NAMES = ["red circle", "blue square", "green_cross"]
TEMPLATES = ("a photo of a {}.", "a {} on the left.")


@pytest.fixture
def tiny_config(tmp_path: Path) -> str:
    path = tmp_path / "tiny_clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def tiny_classifier(config: str, names=NAMES, templates=TEMPLATES, seed: int = 0) -> ClipClassifier:
    torch.manual_seed(seed)
    clip = build_clip_model(config)
    return ClipClassifier(clip, tokenize_prompts(clip_tokenizer(config), list(names), templates)).eval()


@pytest.fixture
def clip_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
