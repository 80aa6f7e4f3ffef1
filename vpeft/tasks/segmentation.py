"""Semantic segmentation: per-pixel cross-entropy (optionally + Dice), evaluated by mIoU and mean Dice.

Config (``task: segmentation``)::

    model:
      head: {name: upernet, indices: [3, 5, 7, 11], channels: 512,   # the head and its options (heads/segmentation)
             dice_weight: 0.0,                                      # > 0: loss = CE + dice_weight * Dice
             slide: {crop: 512, stride: 341}}                       # sliding-window evaluation (default: whole image)
    data:
      name: ade20k | seg_folder | shapes                             # vpeft.data.segmentation.SEG_DATASETS
      options: {scale: [0.25, 1.0], ratio: [1, 1], eval_short_side: 512}   # transforms; the rest: dataset

The loss ignores mask value 255 (:data:`~vpeft.data.segmentation.IGNORE_INDEX`). Evaluation accumulates one
confusion matrix over the split (summed over processes) and reports, in percent: ``mIoU`` (mean over classes of
TP / (TP + FP + FN)), ``mDice`` (mean of 2TP / (2TP + FP + FN)) and ``aAcc`` (pixel accuracy); a class absent from
both the labels and the predictions is left out of the means, as mmsegmentation does.

Sliding-window inference (the mmsegmentation ``slide`` mode): windows of ``crop`` pixels every ``stride`` pixels,
the last one flush with the border; each pixel's logits are the average over the windows that cover it. Windows
larger than the image are zero-padded (zero is the normalised mean colour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..backbones import build_backbone
from ..backbones.checkpoint import load_pretrained
from ..data.segmentation import IGNORE_INDEX, build_seg_dataset, build_seg_transform, collate_pairs
from ..deps import require
from ..errors import ConfigError, DataError
from ..heads.segmentation import build_segmentation_model
from .base import Reduce, Task

MaskedDiceLoss = require("monai.losses", "seg", "the segmentation task's Dice loss").MaskedDiceLoss

TRANSFORM_OPTIONS = ("scale", "ratio", "eval_short_side")


def _pair(value: int | Sequence[int], key: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"model.head.slide.{key} must be a positive integer or [h, w], got {value!r}.")
    return pair


@torch.no_grad()
def slide_inference(model: nn.Module, images: Tensor, crop: int | Sequence[int], stride: int | Sequence[int]) -> Tensor:
    """Logits (B, K, H, W) of ``images`` (B, 3, H, W) averaged over ``crop`` windows placed every ``stride``."""
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    height, width = images.shape[-2:]
    total, count = None, images.new_zeros(1, 1, height, width)
    for row in range(max(height - ch + sh - 1, 0) // sh + 1):
        for col in range(max(width - cw + sw - 1, 0) // sw + 1):
            y1, x1 = max(min(row * sh + ch, height) - ch, 0), max(min(col * sw + cw, width) - cw, 0)
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            window = F.pad(images[..., y1:y2, x1:x2], (0, cw - (x2 - x1), 0, ch - (y2 - y1)))  # to (B, 3, ch, cw)
            logits = model(window)[..., : y2 - y1, : x2 - x1].float()
            if total is None:
                total = logits.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return total / count


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts, rows = true class, columns = predicted; pixels labelled ``IGNORE_INDEX`` are skipped."""
    valid = target != IGNORE_INDEX
    if ((target[valid] < 0) | (target[valid] >= num_classes)).any():
        raise DataError(f"target values outside 0..{num_classes - 1} (and {IGNORE_INDEX}) in the batch.")
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(confusion: Tensor) -> dict[str, float]:
    """mIoU, mDice and pixel accuracy (percent) of a confusion matrix; classes never seen nor predicted skipped."""
    confusion = confusion.double()
    tp = confusion.diag()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    present = (tp + fp + fn) > 0
    iou, dice = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)
    return {
        "mIoU": 100.0 * iou[present].mean().item(),
        "mDice": 100.0 * dice[present].mean().item(),
        "aAcc": 100.0 * (tp.sum() / confusion.sum()).item(),
    }


class SegmentationTask(Task):
    metric = "mIoU"
    collate = staticmethod(collate_pairs)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        head = dict(cfg.model.head)
        self.dice_weight = float(head.pop("dice_weight", 0.0))
        slide = head.pop("slide", None)
        if slide is not None:
            unknown = set(slide) - {"crop", "stride"} if isinstance(slide, dict) else {"(not a mapping)"}
            if unknown or "crop" not in slide:
                raise ConfigError(
                    f"model.head.slide takes {{crop, stride}} (stride defaults to 2/3 crop), got {slide}."
                )
            crop = _pair(slide["crop"], "crop")
            slide = {"crop": crop, "stride": _pair(slide.get("stride", [max(c * 2 // 3, 1) for c in crop]), "stride")}
        self.slide = slide
        self.head_options = head
        self._dice = MaskedDiceLoss(softmax=True)

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        backbone = build_backbone(
            cfg.model.name, img_size=cfg.model.img_size, drop_path=cfg.model.drop_path, **cfg.model.kwargs
        )
        if cfg.model.pretrained:
            load_pretrained(backbone.model, cfg.model.pretrained)
        data_config = dict(backbone.data_config)
        if cfg.data.img_size:
            data_config["input_size"] = (3, cfg.data.img_size, cfg.data.img_size)
        options = dict(cfg.data.options)
        transform_options = {k: options.pop(k) for k in TRANSFORM_OPTIONS if k in options}
        for key in ("scale", "ratio"):
            if key in transform_options:
                transform_options[key] = tuple(transform_options[key])
        splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
        datasets = {}
        for role, split in splits.items():
            if split is not None:
                transform = build_seg_transform(data_config, train=role == "train", **transform_options)
                datasets[role] = build_seg_dataset(cfg.data.name, cfg.data.root, split, transform, **options)
        num_classes = datasets["train"].num_classes
        if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes is {cfg.model.num_classes} but dataset {cfg.data.name!r} has {num_classes} "
                "classes; drop model.num_classes or fix data.options.num_classes."
            )
        model = build_segmentation_model(backbone, num_classes, **self.head_options)
        return model, datasets

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        images, masks = batch
        logits = model(images).float()  # (B, K, H, W)
        valid = masks != IGNORE_INDEX
        if not valid.any():  # cross-entropy's mean over no pixels is NaN; keep the graph, add nothing
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        if self.dice_weight:
            # one-hot by hand: MONAI's to_onehot_y would turn a masked-out pixel into class 0
            target = F.one_hot(masks.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid[:, None]
            loss = loss + self.dice_weight * self._dice(logits, target, mask=valid[:, None])  # (B, K, H, W) each
        return loss

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Logits (B, K, H, W): one forward pass, or sliding windows when ``model.head.slide`` is set."""
        if self.slide is None:
            return model(images)
        return slide_inference(model, images, self.slide["crop"], self.slide["stride"])

    def start(self, model: nn.Module, device: torch.device) -> Tensor:
        return torch.zeros(2 + model.num_classes**2, dtype=torch.float64)  # loss sum, labelled pixels, confusion

    def accumulate(self, state: Tensor, model: nn.Module, batch: Any) -> None:
        images, masks = batch
        if isinstance(images, Tensor):  # one stacked batch, else a list of differently sized images
            images, masks = [images], [masks]
        num_classes = model.num_classes
        for image, mask in zip(images, masks, strict=True):
            if image.dim() == 3:
                image, mask = image[None], mask[None]
            logits = self.predict(model, image).float()
            loss = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
            confusion = confusion_matrix(logits.argmax(1), mask, num_classes)
            state += torch.cat([torch.stack([loss.cpu(), confusion.sum().cpu()]).double(), confusion.flatten().cpu()])

    def summarise(self, state: Tensor, reduce: Reduce) -> dict[str, float]:
        sums = reduce(state)
        if sums[1] == 0:
            raise DataError("evaluation split has no labelled pixels")
        num_classes = math.isqrt(len(sums) - 2)
        return {"loss": (sums[0] / sums[1]).item(), **scores(sums[2:].reshape(num_classes, num_classes))}
