"""Object detection: a ViTDet-style detector (:mod:`vpeft.heads.detection`) on COCO-format data; COCO box mAP.

Config: ``task: detection``; ``model.head: {name: faster_rcnn | retinanet | fcos, <options>}`` (head options in
:mod:`vpeft.heads.detection`); ``data.name``: ``coco`` or ``shapes`` (:mod:`vpeft.data.coco`) with ``data.options``
going to the dataset builder (``clip_boxes``, ``images``/``annotations`` templates, ``flip``; for shapes ``counts``,
``size``, ``seed``). ``model.num_classes``, when set, must equal the training json's category count.

Loss: the sum of torchvision's loss dict in training mode (RPN + box losses, or classification + regression (+
centerness for FCOS)); crowd boxes are left out of the training targets. Evaluation: COCO box AP with torchmetrics'
``MeanAveragePrecision`` on the pycocotools backend (COCOeval itself: crowd regions ignored, 101-point interpolation,
IoU 0.50:0.05:0.95, up to 100 detections per image), reported in percent: ``map``, ``map_50``, ``map_75``,
``map_small``/``medium``/``large`` and ``mar_100`` (-1 where COCOeval has no ground truth for a figure).

Data parallelism: COCO AP is not a sum over images, so each process's detections and ground truth are gathered with
the engine's sum-``reduce`` (every image's rows go into a zero tensor at its dataset index, and the sum over processes
fills each slot once); every process then computes the same AP over the whole split: exactly a single process's result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..backbones import build_backbone
from ..backbones.checkpoint import load_pretrained
from ..data.coco import build_detection_dataset, collate
from ..deps import require
from ..errors import ConfigError, DataError
from ..heads.detection import DetectionModel
from .base import Reduce, Task

MeanAveragePrecision = require("torchmetrics.detection", "det", "the detection task's COCO mAP").MeanAveragePrecision

Record = tuple[int, dict[str, Tensor], dict[str, Tensor]]  # (dataset index, prediction, ground truth)
_PRED = ("boxes", 4), ("scores", 1), ("labels", 1)
_TRUTH = ("boxes", 4), ("labels", 1), ("iscrowd", 1), ("area", 1)
_REPORTED = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class DetectionTask(Task):
    metric = "map"
    collate = staticmethod(collate)

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
        datasets = {
            role: build_detection_dataset(cfg.data.name, cfg.data.root, split, role == "train", **cfg.data.options)
            for role, split in splits.items()
            if split is not None
        }
        backbone = build_backbone(
            cfg.model.name, img_size=cfg.model.img_size, drop_path=cfg.model.drop_path, **cfg.model.kwargs
        )
        if cfg.model.pretrained:
            load_pretrained(backbone.model, cfg.model.pretrained)
        options = dict(cfg.model.head)
        detector = options.pop("name", "faster_rcnn")
        num_classes = datasets["train"].num_classes
        if cfg.model.num_classes not in (None, num_classes):
            raise ConfigError(
                f"model.num_classes is {cfg.model.num_classes} but detection dataset {cfg.data.name!r} has "
                f"{num_classes} categories; leave it unset or make them agree."
            )
        return DetectionModel(backbone, num_classes, detector, **options), datasets

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        images, targets = batch
        losses = model(images, [training_target(t) for t in targets])
        return sum(losses.values())

    def start(self, model: nn.Module, device: torch.device) -> list[Record]:
        return []

    def accumulate(self, state: list[Record], model: nn.Module, batch: Any) -> None:
        images, targets = batch
        predictions = model(list(images))
        for prediction, target in zip(predictions, targets, strict=True):
            prediction = {k: prediction[k].detach().cpu() for k, _ in _PRED}
            prediction["boxes"], prediction["scores"] = prediction["boxes"].float(), prediction["scores"].float()
            state.append((int(target["index"]), prediction, {k: target[k].cpu() for k, _ in _TRUTH}))

    def summarise(self, state: list[Record], reduce: Reduce) -> dict[str, float]:
        return coco_map(gather(state, reduce))


def training_target(target: dict[str, Any]) -> dict[str, Tensor]:
    """Boxes and labels without the crowd regions (torchvision's detectors have no ignore regions)."""
    keep = target["iscrowd"] == 0
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep]}


def coco_map(records: list[Record]) -> dict[str, float]:
    """COCO box AP (percent) of ``(index, prediction, ground truth)`` records: torchmetrics on pycocotools."""
    if not records:
        raise DataError("evaluation split is empty")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update([r[1] for r in records], [r[2] for r in records])
    result = metric.compute()
    return {k: float(result[k]) * 100 if float(result[k]) >= 0 else -1.0 for k in _REPORTED}


def gather(records: list[Record], reduce: Reduce) -> list[Record]:
    """Every process's records on every process, with a sum-only ``reduce`` (see the module docstring).

    Needs the shards to partition the dataset's indices 0..N-1 (the engine's ``Subset(range(rank, N, world))``);
    anything else is an error rather than a wrong AP.
    """
    total = int(reduce(torch.tensor([len(records)], dtype=torch.float64)).item())
    if total == len(records):  # one process, or all images here
        return records
    counts = torch.zeros(total, 1 + len(_PRED) + len(_TRUTH), dtype=torch.float64)  # present, rows per field
    for index, prediction, truth in records:
        if not 0 <= index < total:
            raise ValueError(f"distributed evaluation: dataset index {index} outside 0..{total - 1}.")
        counts[index, 0] = 1
        counts[index, 1] = len(prediction["boxes"])
        counts[index, 2] = len(truth["boxes"])
    counts = reduce(counts)
    if not torch.all(counts[:, 0] == 1):
        raise ValueError(
            "distributed evaluation: the processes' images do not cover the dataset indices 0..N-1 exactly once; "
            "evaluate the full split in each process, or shard it with Subset(range(rank, N, world))."
        )
    pred = _slots(records, 1, _PRED, int(counts[:, 1].max()), total, reduce)
    truth = _slots(records, 2, _TRUTH, int(counts[:, 2].max()), total, reduce)
    return [
        (i, _unpack(pred[i, : int(counts[i, 1])], _PRED), _unpack(truth[i, : int(counts[i, 2])], _TRUTH))
        for i in range(total)
    ]


def _slots(records: list[Record], which: int, fields: tuple, rows: int, total: int, reduce: Reduce) -> Tensor:
    """(total, rows, width) float64: each record's fields side by side at its index, summed over processes."""
    width = sum(w for _, w in fields)
    slots = torch.zeros(total, rows, width, dtype=torch.float64)
    for record in records:
        part = record[which]
        if len(part["boxes"]):
            slots[record[0], : len(part["boxes"])] = torch.cat(
                [part[k].reshape(len(part["boxes"]), w).double() for k, w in fields], dim=1
            )
    return reduce(slots)


def _unpack(rows: Tensor, fields: tuple) -> dict[str, Tensor]:
    """(n, width) -> the fields as their usual dtypes (labels and crowd flags int64, the rest float32)."""
    out, start = {}, 0
    for key, width in fields:
        column = rows[:, start : start + width]
        value = column.long() if key in ("labels", "iscrowd") else column.float()
        out[key] = value.flatten() if width == 1 else value
        start += width
    return out
