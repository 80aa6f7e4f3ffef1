"""ViTDet-style detection: a plain ViT's last block -> simple feature pyramid -> a torchvision detector.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet, ECCV 2022): the
detector reads only the last ViT block's (B, C, h, w) map; :class:`~vpeft.heads.pyramid.SimpleFeaturePyramid` turns
it into maps at ``scales`` (default 4, 2, 1, 0.5: strides p/4 ... 2p for patch size p, P2-P5 for p = 16) and one more
level max-pools the coarsest by 2 (P6, as FPN's and ViTDet's RPN use). Any torchvision detector runs on these levels:

- ``faster_rcnn``: ``torchvision.models.detection.FasterRCNN`` (Ren et al., NeurIPS 2015) with ViTDet's heads: a
  2-conv RPN head, and a box head of ``box_convs`` (4) convs with LayerNorm + one fc of ``box_fc`` (1024) units;
  RPN anchors ``anchor_scale * stride`` (8: 32 px at stride 4, as FPN) with ratios 0.5, 1, 2; RoIAlign 7x7 over the
  pyramid levels (not the pooled one);
- ``retinanet``: ``RetinaNet`` (Lin et al., ICCV 2017), anchors ``anchor_scale * stride * 2^(i/3)``, i = 0, 1, 2
  (``anchor_scale`` 4), ratios 0.5, 1, 2;
- ``fcos``: ``FCOS`` (Tian et al., ICCV 2019), one point per location (torchvision sizes its regression ranges from
  an anchor of side ``stride``).

Other ``model.head`` options go to the torchvision constructor (``box_batch_size_per_image``, ``score_thresh``...),
checked against its signature. ``num_classes`` is the number of foreground classes K, and labels are 1..K in and out:
Faster R-CNN's softmax has K + 1 outputs (0 the background); FCOS's and RetinaNet's per-class sigmoids have K, so
:class:`DetectionHead` shifts their labels to 0..K-1 and back.

Input: torchvision's ``GeneralizedRCNNTransform`` normalises with the backbone's ``data_config`` mean and std, scales
each image so its long side is the backbone's input size S, and pads the batch: to the square S x S when the ViT takes
one size (ViTDet's recipe: long side 1024, padded to 1024 x 1024), to a multiple of the patch size when it takes any
(timm's ``dynamic_img_size=True``). Boxes come back in the caller's pixel coordinates.

Where the ViT sits: the PEFT core trains, saves and copies (one per adapter) exactly the module ``get_classifier()``
returns, so :class:`DetectionHead` (pyramid + detector) must not contain the ViT. torchvision's detector still calls
``self.backbone(images.tensors)`` on the normalised, padded batch, and only then can the ViT run. So the detector's
``backbone`` is a :class:`PyramidNeck` holding the pyramid only; :class:`DetectionModel` lends it the ViT for the
length of one call (``DetectionHead.forward(images, targets, encoder=vit)``). The ViT is never a submodule or an
attribute of the head between calls, so copies of the head are small and the adapted ViT is shared by all of them.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from ..backbones import Backbone
from ..errors import ConfigError
from .pyramid import SimpleFeaturePyramid

DETECTORS = {"faster_rcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}
DEFAULT_ANCHOR_SCALE = {"faster_rcnn": 8.0, "retinanet": 4.0, "fcos": 1.0}
# set here from the backbone and the pyramid; a config may not override them
_DERIVED = {
    "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size",
    "anchor_generator", "rpn_anchor_generator", "head", "rpn_head", "box_roi_pool", "box_head", "box_predictor",
}  # fmt: skip


class PyramidNeck(nn.Module):
    """torchvision's detector ``backbone``: the lent ViT's last block -> pyramid levels + one max-pooled level."""

    def __init__(self, in_channels: int, out_channels: int, scales: Sequence[float], patch_size: int):
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(in_channels, out_channels, scales)
        self.out_channels = out_channels  # torchvision reads it
        strides = self.pyramid.strides(patch_size)
        self.strides = [*strides, strides[-1] * 2]  # pixels per cell of each level, the pooled one last
        self.names = [str(i) for i in range(len(strides))] + ["pool"]
        self._encoder: Backbone | None = None  # set by lend() for one call only (see the module docstring)

    @contextlib.contextmanager
    def lend(self, encoder: Backbone) -> Iterator[None]:
        self.__dict__["_encoder"] = encoder  # a plain attribute: nn.Module.__setattr__ would register it
        try:
            yield
        finally:
            self.__dict__["_encoder"] = None

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self._encoder is None:
            raise RuntimeError("PyramidNeck runs inside DetectionHead.forward(images, targets, encoder=vit) only.")
        (feature,) = self._encoder.features(x, [-1])  # (B, C, H/p, W/p)
        levels = self.pyramid([feature])
        levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2))  # P6: subsampled coarsest level
        return OrderedDict(zip(self.names, levels, strict=True))


class DetectionHead(nn.Module):
    """Pyramid + torchvision detector (no ViT): what ``DetectionModel.get_classifier()`` returns."""

    def __init__(
        self,
        detector: str,
        num_classes: int,
        in_channels: int,
        patch_size: int,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        pad_to: int,
        out_channels: int = 256,
        scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        anchor_scale: float | None = None,
        box_convs: int | None = None,
        box_fc: int | None = None,
        **options: Any,
    ):
        super().__init__()
        if detector not in DETECTORS:
            close = difflib.get_close_matches(detector, list(DETECTORS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"model.head.name {detector!r} is not a detector.{hint} Choose from {sorted(DETECTORS)}.")
        if num_classes < 1:
            raise ConfigError(f"num_classes is the number of foreground classes and must be >= 1, got {num_classes}.")
        _check_options(detector, options)
        if detector != "faster_rcnn" and (box_convs, box_fc) != (None, None):
            raise ConfigError(f"model.head.box_convs and box_fc are Faster R-CNN options; {detector} has no box head.")
        box_convs, box_fc = 4 if box_convs is None else box_convs, box_fc or 1024
        neck = PyramidNeck(in_channels, out_channels, scales, patch_size)
        size = anchor_scale or DEFAULT_ANCHOR_SCALE[detector]
        levels = len(neck.strides)
        common = dict(
            min_size=image_size, max_size=image_size, image_mean=list(image_mean), image_std=list(image_std),
            size_divisible=pad_to,
        )  # fmt: skip
        if detector == "faster_rcnn":
            anchors = AnchorGenerator(tuple((size * s,) for s in neck.strides), ((0.5, 1.0, 2.0),) * levels)
            convs = [out_channels] * box_convs
            box_head = FastRCNNConvFCHead((out_channels, 7, 7), convs, [box_fc], norm_layer=LayerNorm2d)
            self.detector = FasterRCNN(
                neck,
                None,  # the classes are box_predictor's (torchvision refuses both)
                rpn_anchor_generator=anchors,
                rpn_head=RPNHead(out_channels, 3, conv_depth=2),
                box_roi_pool=MultiScaleRoIAlign(neck.names[:-1], output_size=7, sampling_ratio=0),
                box_head=box_head,
                box_predictor=FastRCNNPredictor(box_fc, num_classes + 1),
                **common,
                **options,
            )
        elif detector == "retinanet":
            octaves = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
            anchors = AnchorGenerator(
                tuple(tuple(size * s * o for o in octaves) for s in neck.strides), ((0.5, 1.0, 2.0),) * levels
            )
            self.detector = RetinaNet(neck, num_classes, anchor_generator=anchors, **common, **options)
        else:  # fcos: torchvision derives each level's regression range from this anchor side
            anchors = AnchorGenerator(tuple((float(s),) for s in neck.strides), ((1.0,),) * levels)
            self.detector = FCOS(neck, num_classes, anchor_generator=anchors, **common, **options)
        self.label_offset = 0 if detector == "faster_rcnn" else 1  # sigmoid detectors: no background output

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, *, encoder: Backbone):
        """Training: torchvision's loss dict; evaluation: ``[{boxes, scores, labels}]`` per image."""
        shift = self.label_offset
        if targets is not None and shift:
            targets = [{**t, "labels": t["labels"] - shift} for t in targets]
        with self.detector.backbone.lend(encoder):
            out = self.detector(images, targets)
        if self.training or not shift:
            return out
        return [{**found, "labels": found["labels"] + shift} for found in out]


def _check_options(detector: str, options: dict[str, Any]) -> None:
    accepted = set(inspect.signature(DETECTORS[detector].__init__).parameters) - _DERIVED - {"self", "kwargs"}
    accepted |= {"out_channels", "scales", "anchor_scale"}
    accepted |= {"box_convs", "box_fc"} if detector == "faster_rcnn" else set()
    for key in options:
        if key in _DERIVED:
            raise ConfigError(f"model.head.{key} is set by vpeft from the backbone and the pyramid; remove it.")
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"model.head.{key} is not an option of {detector}.{hint} Options: {sorted(accepted)}.")


class DetectionModel(nn.Module):
    """A :class:`~vpeft.backbones.Backbone` and a :class:`DetectionHead` over its last block.

    ``model(images, targets)`` takes lists of (3, H, W) float images in [0, 1] and target dicts (``boxes`` XYXY
    pixels, ``labels`` 1..K); in training mode it returns torchvision's loss dict, in evaluation mode the detections.
    ``head`` options: see the module docstring.
    """

    def __init__(self, backbone: Backbone, num_classes: int, detector: str = "faster_rcnn", **options: Any):
        super().__init__()
        self.backbone = backbone
        _, height, width = backbone.data_config["input_size"]
        dynamic = bool(getattr(backbone.model, "dynamic_img_size", False))
        if height != width and not dynamic:
            raise ConfigError(
                f"detection pads images to a square of the backbone's input size, but it is {height}x{width}; use a "
                "square img_size or a backbone with dynamic_img_size=True."
            )
        self.head = DetectionHead(
            detector,
            num_classes,
            backbone.embed_dim,
            backbone.patch_size,
            image_size=max(height, width),
            image_mean=backbone.data_config["mean"],
            image_std=backbone.data_config["std"],
            pad_to=backbone.patch_size if dynamic else max(height, width),
            **options,
        )

    def get_classifier(self) -> nn.Module:
        return self.head  # pyramid + detector: trained, saved and copied per adapter by the core

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        return self.head(images, targets, encoder=self.backbone)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """The backbone's token names (``pos_embed``, ``cls_token``...), for full fine-tuning's param groups."""
        model = self.backbone.model
        return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
