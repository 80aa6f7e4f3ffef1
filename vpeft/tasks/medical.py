"""Medical image segmentation (task ``medical_segmentation``): MONAI data, losses and metrics, 2D slices or 3D patches.

Config (see configs/medical/ and docs/medical.md)::

    task: medical_segmentation
    model:
      name: sam:vit_b                      # any vpeft backbone; img_size = the 2D input (slices are resized to it)
      img_size: 256
      head: {name: sam, prompt: box}       # sam | unetr | light, with their options (MedicalHead below)
    data:
      name: btcv                           # recorded only
      root: data/btcv                      # the Decathlon datalist's base folder
      train_split: training                # datalist keys
      val_split: validation
      test_split: validation
      options: {datalist: dataset.json, modality: CT, window: abdomen, spacing: [1.5, 1.5, 2.0], mode: 2d}

Training items are 2D slices (``mode: 2d``, :class:`~vpeft.medical.slices.SliceDataset`) or 3D patches (``mode:
3d``); evaluation always runs on whole cases: slice predictions are stacked back into the volume, or the volume is
covered by a sliding window, and Dice, HD95 and NSD are computed per class in 3D with the case's spacing
(:class:`~vpeft.medical.metrics.CaseMetrics`). The prompted SAM head gets prompts generated from the label with a
seeded generator (training: one stream from ``train.seed``; evaluation: restarted at ``train.seed`` each time, so
every evaluation sees the same prompts); the policy is logged at build.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..backbones import build_backbone
from ..deps import require
from ..errors import ConfigError
from ..heads.sam import SamHead, SamPrompts, load_sam_decoder, masks_to_prompts
from ..heads.segmentation import LinearHead, default_indices
from ..heads.unetr import UnetrDecoder
from ..medical.metrics import CaseMetrics
from ..medical.model import MedicalSegmenter, embedding_channels
from ..medical.preprocess import Preprocessing
from ..medical.slices import CaseDataset, PatchDataset, SliceDataset, predict_patches, predict_slices
from ..medical.synthetic import write_synthetic
from ..medical.volumes import datalist_classes, load_volumes, read_datalist
from .base import Reduce, Task

_losses = require("monai.losses", "medical", "the medical segmentation losses")
DiceCELoss, DiceFocalLoss, DiceLoss = _losses.DiceCELoss, _losses.DiceFocalLoss, _losses.DiceLoss

log = logging.getLogger("vpeft")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MedicalData(_Options):
    """``data.options`` of the task."""

    datalist: str = "dataset.json"  # relative to data.root
    classes: list[str] | None = None  # background first; default: the datalist's "labels"
    modality: Literal["CT", "MR", "RGB", "none"] = "none"
    window: list[float] | str | None = None  # [low, high] HU or a preset name
    percentiles: list[float] = [0.5, 99.5]
    spacing: list[float] | None = None
    orientation: str | None = None
    spatial_dims: Literal[2, 3] = 3
    channels: int = Field(1, ge=1)
    mode: Literal["2d", "3d"] = "2d"
    axis: int = Field(2, ge=0, le=2)
    context: int = Field(0, ge=0)  # 2.5D: neighbouring slices each side as channels
    foreground_ratio: float | None = None
    augment: Literal["none", "light"] = "none"
    patch: list[int] | None = None  # 3D training patch; in-plane sizes = model.img_size
    samples_per_volume: int = Field(4, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    inference_batch: int = Field(8, ge=1)
    cache_dir: str | None = None
    synthetic: dict[str, Any] | None = None  # write MONAI's synthetic data to data.root first (write_synthetic options)
    nsd_tolerance: float = Field(1.0, gt=0.0)  # mm


class MedicalHead(_Options):
    """``model.head`` of the task (options of the other heads are refused)."""

    name: Literal["sam", "unetr", "light"] = "sam"
    loss: Literal["dice_ce", "dice_focal", "dice"] = "dice_ce"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0  # the CE (or focal) weight
    indices: list[int] | None = None  # unetr/light: blocks whose features are decoded
    # sam
    prompt: Literal["box", "points", "box+points", "none"] = "box"
    positive: int = Field(1, ge=0)
    negative: int = Field(0, ge=0)
    jitter: float = Field(0.0, ge=0.0, lt=1.0)
    embed_dim: int = Field(256, ge=8)
    depth: int = Field(2, ge=1)
    num_heads: int = Field(8, ge=1)
    mlp_dim: int = Field(2048, ge=1)
    checkpoint: str | None = None  # official SAM/MedSAM file: its prompt encoder and mask decoder
    # unetr / light
    feature_size: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


def _tuple(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list) else value


def _options(cls: type[_Options], values: dict[str, Any], where: str) -> Any:
    try:
        return cls(**values)
    except ValidationError as err:
        problems = "; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{problems}. Valid keys of {where}: {sorted(cls.model_fields)}.") from None


class _Evaluation:
    """What one evaluation accumulates: the per-class sums, where cases are predicted, and the prompt generator."""

    def __init__(self, metrics: CaseMetrics, device: torch.device, seed: int):
        self.metrics, self.device = metrics, device
        self.generator = torch.Generator().manual_seed(seed)


class MedicalSegmentationTask(Task):
    metric = "dice"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.data = _options(MedicalData, dict(cfg.data.options), "data.options")
        self.head = _options(MedicalHead, dict(cfg.model.head), "model.head")
        size = cfg.model.img_size or cfg.data.img_size
        if size is None:
            raise ConfigError("medical_segmentation needs model.img_size: the 2D input size slices are resized to.")
        self.size = (size, size)
        self.preprocessing = Preprocessing(
            modality=self.data.modality, window=_tuple(self.data.window), percentiles=_tuple(self.data.percentiles),
            spacing=_tuple(self.data.spacing), orientation=self.data.orientation, spatial_dims=self.data.spatial_dims,
        )  # fmt: skip
        d, h = self.data, self.head
        if d.mode == "3d" and (d.spatial_dims != 3 or h.name != "unetr" or d.patch is None):
            raise ConfigError("data.options.mode 3d needs 3-D data, model.head.name unetr and data.options.patch.")
        if d.patch is not None and len(d.patch) != 3:
            raise ConfigError(f"data.options.patch must hold 3 sizes, got {d.patch}.")
        if d.mode == "3d" and [s for i, s in enumerate(d.patch) if i != d.axis] != [size, size]:
            raise ConfigError(
                f"data.options.patch {list(d.patch)}: its in-plane sizes must equal model.img_size {size}."
            )
        if h.name == "sam" and h.prompt != "none" and "points" in h.prompt and h.positive < 1:
            raise ConfigError("model.head.prompt uses points: model.head.positive must be >= 1.")
        self.loss_fn = self._loss_fn()
        self._train_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.classes: list[str] = []

    # -- build ------------------------------------------------------------------------------------------------------

    def export(self, adapter_dir: Path) -> None:
        """The intensity rule, orientation and spacing go beside the adapter: inference re-applies them."""
        self.preprocessing.save(adapter_dir)

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg, d = self.cfg, self.data
        root = Path(cfg.data.root or ".")
        if d.synthetic is not None:
            write_synthetic(root, **d.synthetic)  # skipped when a complete copy exists
        datalist = root / d.datalist
        self.resolve_classes()
        splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
        datasets: dict[str, Dataset] = {}
        for role, split in splits.items():
            if split is None:
                continue
            entries = read_datalist(datalist, split, root)
            volumes = load_volumes(
                entries, self.preprocessing, len(self.classes), d.channels, d.cache_dir, f"{datalist} [{split}]"
            )
            if role != "train":
                datasets[role] = CaseDataset(volumes)
            elif d.mode == "2d":
                datasets[role] = SliceDataset(
                    volumes, self.size, d.axis, d.context, d.foreground_ratio, d.augment, cfg.train.seed
                )
            else:
                datasets[role] = PatchDataset(volumes, d.patch, d.samples_per_volume, seed=cfg.train.seed)
        log.info(
            "vpeft: medical_segmentation %s, classes %s, %s; head %s%s",
            d.mode, self.classes, self.preprocessing.to_dict(), self.head.name, self._prompt_policy(),
        )  # fmt: skip
        return self.build_model(), datasets

    def resolve_classes(self) -> list[str]:
        """The class names, background first: ``data.options.classes`` or the datalist's ``labels`` map."""
        datalist = Path(self.cfg.data.root or ".") / self.data.datalist
        self.classes = self.data.classes or (datalist_classes(datalist) if datalist.is_file() else None) or []
        if len(self.classes) < 2:
            raise ConfigError(
                f"no class list: set data.options.classes (background first) or a 'labels' map in {datalist}."
            )
        return self.classes

    def build_model(self) -> MedicalSegmenter:
        """The segmenter alone (no volume is read): the class count comes from the config or the datalist."""
        if not self.classes:
            self.resolve_classes()
        cfg, h = self.cfg, self.head
        backbone = build_backbone(
            cfg.model.name, pretrained=cfg.model.pretrained, img_size=self.size[0], drop_path=cfg.model.drop_path,
            **cfg.model.kwargs,
        )  # fmt: skip
        k = len(self.classes)
        channels = self.data.channels * (2 * self.data.context + 1 if self.data.mode == "2d" else 1)
        indices, prompter = h.indices, None
        if h.name == "sam":
            width = embedding_channels(backbone)
            sam_neck = width == backbone.embed_dim  # plain ViT tokens get SAM's neck; a SAM neck's output does not
            head: nn.Module = SamHead(
                width, self.size, k, h.prompt, h.embed_dim, h.depth, h.num_heads, h.mlp_dim, sam_neck
            )
            prompter = SamPrompts(h.embed_dim, backbone.grid(self.size), self.size, h.prompt)
            if h.checkpoint:
                load_sam_decoder(prompter, head, h.checkpoint)
            indices = [-1]
        elif h.name == "light":
            indices = indices or [-1]
            head = LinearHead(backbone.embed_dim, len(indices), k, h.dropout)
        else:
            stages = UnetrDecoder.stages_for(backbone.patch_size)
            indices = indices or default_indices(backbone.depth, stages)
            spatial = 3 if self.data.mode == "3d" else 2
            up = [1 if i == self.data.axis else 2 for i in range(3)] if spatial == 3 else 2
            width = channels if channels > 1 else 3  # the stem sees the encoder's (repeated) input
            head = UnetrDecoder(spatial, width, backbone.embed_dim, backbone.patch_size, k, h.feature_size, up)
        spatial_dims = 3 if self.data.mode == "3d" else 2
        return MedicalSegmenter(backbone, head, h.name, channels, indices, spatial_dims, self.data.axis, prompter)

    def _prompt_policy(self) -> str:
        h = self.head
        if h.name != "sam":
            return ""
        if h.prompt == "none":
            return " (no prompt: one mask token per class, SAMed)"
        return (
            f" (prompt {h.prompt} per class from the label: {h.positive} positive / {h.negative} negative points, "
            f"box jitter {h.jitter}, seed {self.cfg.train.seed})"
        )

    def _loss_fn(self) -> nn.Module:
        h = self.head
        common = {"to_onehot_y": True, "softmax": True}
        if h.loss == "dice":
            return DiceLoss(**common)
        if h.loss == "dice_focal":
            return DiceFocalLoss(**common, lambda_dice=h.lambda_dice, lambda_focal=h.lambda_ce)
        return DiceCELoss(**common, lambda_dice=h.lambda_dice, lambda_ce=h.lambda_ce)

    # -- train / evaluate -------------------------------------------------------------------------------------------
    def _prompts(self, labels: Tensor, generator: torch.Generator) -> Any:
        h = self.head
        if h.name != "sam" or h.prompt == "none":
            return None
        negative = h.negative if "points" in h.prompt else 0
        return masks_to_prompts(labels, len(self.classes), h.positive, negative, h.jitter, generator)

    def forward(self, model: nn.Module, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        prompts = self._prompts(labels, generator) if labels is not None else None
        if prompts is not None:
            return model(images, prompts)
        return model(images)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        logits = self.forward(model, batch["image"], batch["label"], self._train_gen)
        return self.loss_fn(logits.float(), batch["label"][:, None])

    def items(self, batch: Any) -> int:
        return len(batch["image"]) if isinstance(batch, dict) else len(batch)

    @staticmethod
    def collate(items: list[Any]) -> Any:
        if isinstance(items[0], dict):
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return list(items)  # whole cases (Volume): they differ in shape

    def start(self, model: nn.Module, device: torch.device) -> _Evaluation:
        # the prompt generator restarts at train.seed: every evaluation sees the same prompts
        return _Evaluation(CaseMetrics(self.classes, self.data.nsd_tolerance), device, self.cfg.train.seed)

    def accumulate(self, state: _Evaluation, model: nn.Module, batch: Any) -> None:
        for volume in batch:  # whole cases
            label = torch.as_tensor(volume.label).long()
            image = torch.as_tensor(volume.image).to(state.device)
            logits = self.predict(model, image, label.to(state.device), state.generator)
            state.metrics.add(logits.float().argmax(0).cpu(), label[0], volume.spacing)

    def summarise(self, state: _Evaluation, reduce: Reduce) -> dict[str, float]:
        result = state.metrics.result(reduce)
        if math.isnan(result["dice"]):
            log.warning("vpeft: no evaluated case holds a foreground class; Dice is undefined (nan)")
        return result

    def predict(self, model: nn.Module, image: Tensor, label: Tensor | None, generator: torch.Generator) -> Tensor:
        """Logits (K, *spatial) of one whole case (C, *spatial); ``label`` (1, *spatial) feeds the prompts."""
        d = self.data
        if d.mode == "3d":
            return predict_patches(model, image, d.patch, d.overlap, d.inference_batch)
        fn = lambda x, y: self.forward(model, x, y, generator)  # noqa: E731
        return predict_slices(fn, image, self.size, d.axis, d.context, d.inference_batch, label)
