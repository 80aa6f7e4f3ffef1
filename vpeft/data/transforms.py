"""Image transforms built from timm's resolved pretrained data config.

``data_config`` is what ``timm.data.resolve_data_config({}, model=model)`` returns: ``input_size`` ``(3, H, W)``,
``mean``, ``std``, ``interpolation`` (``"bicubic"``, ``"bilinear"``, ...) and ``crop_pct``. Policies:

* ``none`` (VTAB-1k): resize straight to ``(H, W)`` with the config's interpolation, ``ToTensor``,
  ``Normalize(mean, std)``; identical for training and evaluation.
* ``fgvc`` (VPT's FGVC recipe, 256 -> 224 for ``crop_pct=0.875``): train ``Resize(floor(H / crop_pct))`` ->
  ``RandomCrop(H)`` -> ``RandomHorizontalFlip``; eval ``Resize(floor(H / crop_pct))`` -> ``CenterCrop(H)``; then
  ``ToTensor`` and ``Normalize``. ``Resize`` with one number scales the shorter side (non-square inputs scale each
  side and crop to ``(H, W)``).
* ``randaugment``: train is timm's ImageNet training transform (``RandomResizedCrop``, horizontal flip,
  ``rand-m9-mstd0.5-inc1``) with the config's size, interpolation, mean and std, and random erasing only when
  ``re_prob > 0``; eval is the same as ``none``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from timm.data import create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from ..errors import ConfigError

AUGMENT_POLICIES = ("none", "fgvc", "randaugment")
RANDAUGMENT = "rand-m9-mstd0.5-inc1"


def _size(data_config: Mapping[str, Any]) -> tuple[int, int]:
    input_size = tuple(data_config["input_size"])
    if len(input_size) != 3:
        raise ValueError(f"data_config['input_size'] must be (channels, H, W), got {input_size}")
    return int(input_size[1]), int(input_size[2])


def _interpolation(data_config: Mapping[str, Any]):
    name = data_config.get("interpolation") or "bilinear"
    return str_to_interp_mode("bilinear" if name == "random" else name)


def _to_tensor_normalized(data_config: Mapping[str, Any]) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))]


def build_transform(data_config: Mapping[str, Any], augment: str, train: bool, re_prob: float = 0.0) -> Callable:
    """Build the image transform for one policy and phase.

    Args:
        data_config: timm's resolved data config (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``).
        augment: ``"none"``, ``"fgvc"`` or ``"randaugment"`` (see the module docstring).
        train: Whether to build the training transform (random) or the evaluation transform (deterministic).
        re_prob: Random-erasing probability, used only by ``randaugment`` training; default 0 (off).

    Returns:
        A callable mapping an RGB ``PIL.Image`` to a normalised ``float`` tensor ``(3, H, W)``.

    Raises:
        ValueError: On an unknown policy (the message lists the valid ones).
    """
    if augment not in AUGMENT_POLICIES:
        raise ConfigError(f"unknown augment policy {augment!r}; valid policies: {', '.join(AUGMENT_POLICIES)}")
    height, width = _size(data_config)
    interpolation = _interpolation(data_config)
    if augment == "none" or (augment == "randaugment" and not train):
        return T.Compose([T.Resize((height, width), interpolation=interpolation), *_to_tensor_normalized(data_config)])
    if augment == "fgvc":
        crop_pct = data_config.get("crop_pct") or 0.875
        scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        resize = T.Resize(scaled[0] if height == width else scaled, interpolation=interpolation)
        crop = [T.RandomCrop((height, width)), T.RandomHorizontalFlip()] if train else [T.CenterCrop((height, width))]
        return T.Compose([resize, *crop, *_to_tensor_normalized(data_config)])
    return create_transform(
        input_size=(3, height, width),
        is_training=True,
        auto_augment=RANDAUGMENT,
        interpolation=data_config.get("interpolation") or "bilinear",
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        re_prob=re_prob,
    )
