"""The Backbone interface and the classification task: features, pooling and heads against timm's own results."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.backbones import TimmBackbone
from vpeft.engine import train as engine
from vpeft.engine.config import ConfigError
from vpeft.heads.classification import Classifier

from .conftest import tiny_vit
from .engine.test_train import config


@pytest.fixture
def backbone() -> TimmBackbone:
    return TimmBackbone(tiny_vit())


def test_features_equal_timm_forward_intermediates(backbone, images):
    reference = tiny_vit().forward_intermediates(images, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
    ours = backbone.features(images, [0, -1])
    assert [f.shape for f in ours] == [(2, 64, 4, 4)] * 2
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_features_skip_prompt_tokens_and_follow_the_adapter(backbone, images):
    base = [f.clone() for f in backbone.features(images, [0, 1])]
    vpeft.apply_method(backbone, "vpt_deep", num_prompts=3)
    backbone.eval()  # no prompt dropout
    prompted = backbone.features(images, [0, 1])
    assert [f.shape for f in prompted] == [(2, 64, 4, 4)] * 2  # the 3 prompt tokens are not patch tokens
    assert not torch.allclose(prompted[1], base[1])  # the prompts take part in attention
    with vpeft.disabled(backbone):
        torch.testing.assert_close(backbone.features(images, [0, 1])[1], base[1])


def test_features_reject_indices_outside_the_depth(backbone, images):
    with pytest.raises(ValueError, match=r"feature indices \[2\].*2 blocks.*0\.\.1"):
        backbone.features(images, [2])


def test_classifier_token_pool_equals_timm_head(images):
    timm_model = tiny_vit(num_classes=5)
    classifier = Classifier(TimmBackbone(copy.deepcopy(timm_model)), 5, pool="token")
    classifier.head.load_state_dict(timm_model.head.state_dict())
    torch.testing.assert_close(classifier(images), timm_model(images))


def test_classifier_both_pool_concatenates_class_token_and_patch_mean(backbone, images):
    classifier = Classifier(backbone, 3, pool="both")
    tokens = backbone(images)  # (B, 1 + 16, 64)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1) @ classifier.head.weight.T
    torch.testing.assert_close(classifier(images), expected + classifier.head.bias)
    report = vpeft.apply_method(classifier, "lora")
    assert report.head == 3 * 128 + 3  # get_classifier(): the Linear over the 2C-wide pooled vector


def test_classifier_rejects_an_unknown_pool(backbone):
    with pytest.raises(ValueError, match="pool must be one of"):
        Classifier(backbone, 3, pool="max")


def test_training_with_a_both_pooled_head_runs_through_the_task(tmp_path):
    summary = engine.train(config(tmp_path, "model.head={pool: both}", "train.epochs=1"), tmp_path / "run")
    assert summary["task"] == "classification" and summary["metric"] == "top1"
    hits = summary["test_hits"]  # per test image: the top-1 score is their share
    assert len(hits) == summary["test_size"] and summary["test"]["top1"] == pytest.approx(
        100 * hits.count("1") / len(hits)
    )
    assert summary["trainable_params_with_head"] - summary["trainable_params"] == 10 * 64 + 10  # 2 * width 32


def test_config_names_an_unknown_task_with_close_matches(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'clasification'.*'classification'"):
        config(tmp_path, "task=clasification")


def test_classification_head_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"model.head: classification takes only `pool`, got \['indices'\]"):
        engine.build_run(config(tmp_path, "model.head={indices: [1]}"))
