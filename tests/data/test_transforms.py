"""Transforms from a tiny timm model's resolved data config."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from vpeft.data import AUGMENT_POLICIES, build_transform


@pytest.fixture(scope="module")
def data_config() -> dict:
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2
    )
    return timm.data.resolve_data_config({}, model=model)


def _image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("augment", AUGMENT_POLICIES)
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_matches_config(data_config: dict, augment: str, train: bool) -> None:
    out = build_transform(data_config, augment, train)(_image())
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(data_config["input_size"])


def test_none_normalises_with_config_mean_std(data_config: dict) -> None:
    _, height, width = data_config["input_size"]
    image = _image()
    out = build_transform(data_config, "none", train=True)(image)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[data_config["interpolation"]]
    resized = np.asarray(image.resize((width, height), resample), dtype=np.float32) / 255.0
    manual = (resized - np.array(data_config["mean"], np.float32)) / np.array(data_config["std"], np.float32)
    assert torch.allclose(out, torch.from_numpy(manual).permute(2, 0, 1), atol=1e-5)
    assert torch.equal(out, build_transform(data_config, "none", train=False)(image))


def test_small_input_size_override() -> None:
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    out = build_transform(config, "none", train=False)(Image.new("RGB", (8, 8), (255, 0, 128)))
    assert out.shape == (3, 32, 32)
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255 - 0.5) / 0.25
    assert torch.allclose(out[:, 5, 7], expected, atol=1e-5)


def test_fgvc_train_is_random_and_eval_is_deterministic(data_config: dict) -> None:
    image = _image(300, 260)
    train = build_transform(data_config, "fgvc", train=True)
    evaluate = build_transform(data_config, "fgvc", train=False)
    resize = evaluate.transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == int(data_config["input_size"][1] / data_config["crop_pct"])
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])
    torch.manual_seed(0)
    assert torch.equal(outputs[0], train(image))  # randomness comes from torch's RNG
    assert torch.equal(evaluate(image), evaluate(image))


def test_randaugment_has_no_random_erasing_unless_asked(data_config: dict) -> None:
    plain = build_transform(data_config, "randaugment", train=True)
    erasing = build_transform(data_config, "randaugment", train=True, re_prob=0.25)
    assert not any(isinstance(t, RandomErasing) for t in plain.transforms)
    assert any(isinstance(t, RandomErasing) for t in erasing.transforms)
    assert any("RandAugment" in type(t).__name__ for t in plain.transforms)


def test_unknown_policy_lists_valid_ones(data_config: dict) -> None:
    with pytest.raises(ValueError, match="none, fgvc, randaugment"):
        build_transform(data_config, "autoaugment", train=True)
