"""Image classification: cross-entropy with label smoothing; loss, top-1 and top-5 accuracy (percent).

The model is the timm model itself (timm's own head and pooling, so adapters keep timm's module names) when the
backbone is a timm name and ``model.head.pool`` is ``token`` or ``avg`` (timm's ``global_pool``); other backbones,
and ``pool: both``, get :class:`~vpeft.heads.classification.Classifier`.
"""

from __future__ import annotations

from typing import Any

import timm
import timm.data
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backbones import build_backbone, check_timm_name
from ..backbones.checkpoint import load_pretrained
from ..data import build_dataset, build_transform
from ..data.check import check_image_datasets
from ..errors import ConfigError, DataError
from ..heads.classification import Classifier
from .base import Reduce, Task


class ClassificationTask(Task):
    metric = "top1"

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        options = dict(cfg.model.head)
        pool = options.pop("pool", None)  # None: the backbone's own default (timm's global_pool)
        if options:
            raise ConfigError(f"model.head: classification takes only `pool`, got {sorted(options)}.")
        backbone = None
        if ":" in cfg.model.name or pool == "both":  # a vpeft Backbone with the Classifier head
            backbone = build_backbone(
                cfg.model.name,
                pretrained=cfg.model.pretrained,
                strict=cfg.model.strict,
                img_size=cfg.model.img_size,
                drop_path=cfg.model.drop_path,
                **cfg.model.kwargs,
            )
            data_config = backbone.data_config
        else:
            data_config = self.data_config()
        datasets = image_datasets(cfg, data_config)
        num_classes = cfg.model.num_classes or datasets["train"].num_classes
        source = f"model.num_classes {num_classes}" if cfg.model.num_classes else "the training split's classes"
        check_image_datasets(datasets, num_classes, source)  # before the model is built: every bad item at once
        if backbone is not None:
            return Classifier(backbone, num_classes, pool or "token"), datasets
        kwargs = {**cfg.model.kwargs, **({"global_pool": pool} if pool else {})}
        model = build_model(cfg.model.name, num_classes, None, cfg.model.img_size, cfg.model.drop_path, **kwargs)
        if cfg.model.pretrained:
            load_pretrained(model, cfg.model.pretrained, strict=cfg.model.strict)
        return model, datasets

    def data_config(self) -> dict[str, Any]:
        """Input size, mean, std, interpolation and crop of a timm model's pretrained configuration."""
        cfg = self.cfg
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model.name)
        except RuntimeError:
            pretrained_cfg = None
        if pretrained_cfg is None:
            raise ConfigError(f"model.name {cfg.model.name!r} is not a timm model with a pretrained configuration.")
        size = cfg.data.img_size or cfg.model.img_size or cfg.model.kwargs.get("img_size")
        args = {"input_size": (3, size, size)} if size else {}
        return timm.data.resolve_data_config(args, pretrained_cfg=pretrained_cfg.to_dict())

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        logits = model(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)

    def start(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        return {"sums": torch.zeros(4, dtype=torch.float64), "hits": []}  # sums: loss, top-1 hits, top-5 hits, items

    def accumulate(self, state: dict[str, Any], model: nn.Module, batch: Any) -> None:
        images, labels = batch
        logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits1 = top[:, 0] == labels
        hits5 = (top == labels[:, None]).any(dim=1).sum().item()
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        state["hits"] += hits1.tolist()
        state["sums"] += torch.tensor([loss, hits1.sum().item(), hits5, labels.numel()], dtype=torch.float64)

    def hits(self, state: dict[str, Any]) -> list[bool]:
        """Top-1 hits per image."""
        return state["hits"]

    def summarise(self, state: dict[str, Any], reduce: Reduce) -> dict[str, float]:
        """Loss, top-1 and top-5 (percent) over the split."""
        loss_sum, correct1, correct5, total = reduce(state["sums"]).tolist()
        if total == 0:
            raise DataError("evaluation split is empty")
        return {"loss": loss_sum / total, "top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def image_datasets(cfg: Any, data_config: dict[str, Any]) -> dict[str, Dataset]:
    """The configured image splits by role (train, val, test; a split set to null is left out), each with the
    backbone's preprocessing and, for training, the configured augmentation."""
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    return {
        role: build_dataset(
            cfg.data.name,
            cfg.data.root,
            split,
            build_transform(data_config, cfg.data.augment, train=role == "train"),
            **cfg.data.options,
        )
        for role, split in splits.items()
        if split is not None
    }


def build_model(
    name: str,
    num_classes: int,
    pretrained: str | None = None,
    img_size: int | None = None,
    drop_path: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name)`` with random weights, then ``pretrained`` (a local file) loaded into it."""
    check_timm_name(name, "timm model (model.name)")
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model
