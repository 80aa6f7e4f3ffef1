"""SAM's prompt encoder and mask decoder as a segmentation head, and prompts generated from label masks.

SAM (Kirillov et al., "Segment Anything", ICCV 2023, arXiv:2304.02643) decodes an image embedding (B, E, h, w) with
prompt tokens through a two-way transformer and upscales 4x. :class:`SamHead` uses ``segment_anything.modeling``'s
``PromptEncoder`` (frozen, :class:`SamPrompts`, as MedSAM keeps it), ``MaskDecoder`` and ``TwoWayTransformer`` as
they are (minus the IoU head, which a semantic task never reads), in one of two modes (user-needs M4/M5):

* prompted (``prompt: box | points | box+points``): one prompt set per foreground class, generated from the label by
  :func:`masks_to_prompts` with a seeded generator; each class's single-mask output (SAM's first mask token) is that
  class's logit map, and a class absent from the label gets no prompt and a logit of ``ABSENT`` (the protocol of
  MedSAM and of the SAM papers' box-prompted evaluation: the prompt says which object, the model says its outline).
  Semantic logits are ``[0, l_1, ..., l_K]``: background has the fixed logit 0, so softmax over them is per class
  a sigmoid where the classes do not overlap.
* ``none``: SAMed's recipe (Zhang and Liu, "Customized Segment Anything Model for Medical Image Segmentation",
  arXiv:2304.13785): the default (empty) prompt, and K + 1 mask tokens whose masks are the K + 1 class logits.

Prompt conventions (Medical-SAM-Adapter PR #135 fixed a (y, x) swap): a point is ``(x, y)`` = (column, row) of a
pixel of the (H, W) mask; a box is ``(x_min, y_min, x_max, y_max)``, the extreme pixels' indices (inclusive), as SAM's
predictor and MedSAM take them (SAM's encoder adds 0.5 to reach pixel centres). Negative points lie outside the
class. ``jitter`` moves each box side by up to that fraction of the box size (MedSAM's 0-20 px shift, relative).

The image embedding comes from the backbone: a SAM encoder's neck output (B, 256, h, w) is used as is (a 1x1 conv
when its width differs from ``embed_dim``); a plain ViT's patch tokens get SAM's neck (1x1 conv, LayerNorm2d, 3x3
conv, LayerNorm2d). ``load_sam_decoder`` loads the ``prompt_encoder.`` and ``mask_decoder.`` tensors of an official
SAM/MedSAM file (the mask tokens and their hypernetwork MLPs are skipped when their count differs, as SAMed does).

PEFT placement: the head (neck + mask decoder) is the model's ``get_classifier()``, so by default a method adapts the
encoder and the head trains in full (SAMed: LoRA encoder, fine-tuned decoder). To adapt the decoder with the method
instead, give the method ``head: []`` (nothing trained in full) or a narrower list, and targets in the decoder, e.g.
LoRA ``targets: [q, v, "head.decoder.transformer.layers.\\d+.self_attn.(q|v)_proj"]`` (encoder and decoder) or only the
decoder pattern (frozen encoder): see docs/medical.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError, DataError

log = logging.getLogger("vpeft")
PROMPTS = ("box", "points", "box+points", "none")
ABSENT = -1.0e4  # logit of a class with no prompt (absent from the label)
UNUSED = ("prompt_encoder.mask_downscaling.", "mask_decoder.iou_prediction_head.")  # modules the head drops


@dataclass
class Prompts:
    """Per-image, per-class prompts; K = foreground classes, n = points per class."""

    points: Tensor  # (B, K, n, 2) float, (x, y) pixel indices
    point_labels: Tensor  # (B, K, n) int: 1 positive, 0 negative, -1 padding (SAM's "not a point")
    boxes: Tensor  # (B, K, 4) float (x_min, y_min, x_max, y_max), inclusive pixel indices
    present: Tensor  # (B, K) bool: the class is in the label (its prompts are real)


def masks_to_prompts(
    labels: Tensor,
    num_classes: int,
    positive: int = 1,
    negative: int = 0,
    jitter: float = 0.0,
    generator: torch.Generator | None = None,
) -> Prompts:
    """Prompts for classes 1..num_classes-1 of (B, H, W) class-id ``labels``, drawn with ``generator``."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W) class ids, got shape {tuple(labels.shape)}.")
    cpu = labels.detach().cpu()
    b, h, w = cpu.shape
    k, n = num_classes - 1, positive + negative
    points = torch.zeros(b, k, max(n, 1), 2)
    point_labels = torch.full((b, k, max(n, 1)), -1, dtype=torch.long)
    boxes = torch.zeros(b, k, 4)
    present = torch.zeros(b, k, dtype=torch.bool)
    for i in range(b):
        for c in range(k):
            inside = cpu[i] == c + 1
            rows, cols = torch.nonzero(inside, as_tuple=True)
            if len(rows) == 0:
                continue
            present[i, c] = True
            x0, x1, y0, y1 = cols.min().item(), cols.max().item(), rows.min().item(), rows.max().item()
            if jitter > 0:
                dx, dy = jitter * (x1 - x0 + 1), jitter * (y1 - y0 + 1)
                shift = (torch.rand(4, generator=generator) * 2 - 1) * torch.tensor([dx, dy, dx, dy])
                x0, y0, x1, y1 = (float(v) for v in torch.tensor([x0, y0, x1, y1]) + shift.round())
                x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
                y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
            boxes[i, c] = torch.tensor([x0, y0, x1, y1], dtype=torch.float)
            pos = torch.randint(len(rows), (positive,), generator=generator)
            points[i, c, :positive, 0], points[i, c, :positive, 1] = cols[pos].float(), rows[pos].float()
            point_labels[i, c, :positive] = 1
            out_rows, out_cols = torch.nonzero(~inside, as_tuple=True)
            if negative and len(out_rows):
                neg = torch.randint(len(out_rows), (negative,), generator=generator)
                points[i, c, positive:n, 0], points[i, c, positive:n, 1] = out_cols[neg].float(), out_rows[neg].float()
                point_labels[i, c, positive:n] = 0
    device = labels.device
    return Prompts(points.to(device), point_labels.to(device), boxes.to(device), present.to(device))


def _neck(in_channels: int, out_channels: int) -> nn.Module:
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (bias-free convs)."""
    LayerNorm2d = require("segment_anything.modeling.common", "sam", "SAM's neck").LayerNorm2d
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class SamPrompts(nn.Module):
    """SAM's prompt encoder, frozen as in MedSAM: (B, K) prompt sets -> per-image sparse and dense embeddings.

    It sits outside the trained head (the model's base), so its point, box and mask embeddings, most of which a given
    policy never uses, are not trainable tensors without gradients. Mask prompts are not used: ``mask_downscaling``
    is dropped.
    """

    def __init__(self, embed_dim: int, grid: tuple[int, int], image_size: tuple[int, int], prompt: str = "box"):
        super().__init__()
        PromptEncoder = require("segment_anything.modeling", "sam", "SAM's prompt encoder").PromptEncoder
        if prompt not in PROMPTS:
            raise ConfigError(f"model.head.prompt must be one of {PROMPTS}, got {prompt!r}.")
        self.prompt = prompt
        self.encoder = PromptEncoder(embed_dim, tuple(grid), tuple(image_size), mask_in_chans=16)
        self.encoder.mask_downscaling = None  # mask prompts are not used
        self.requires_grad_(False)

    def forward(self, batch: int, prompts: Prompts | None) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """``[(sparse (K, n, E), dense (K, E, h, w))]`` per image (K = 1, n = 0 without prompts) and the (1, E, h, w)
        positional encoding of the embedding grid."""
        pe = self.encoder.get_dense_pe()
        if self.prompt == "none":
            return [self.encoder(None, None, None)] * batch, pe
        if prompts is None:
            raise ConfigError(f"model.head.prompt is {self.prompt!r}: the forward pass needs prompts.")
        out = []
        for i in range(batch):
            points = (prompts.points[i], prompts.point_labels[i]) if "points" in self.prompt else None
            boxes = prompts.boxes[i] if "box" in self.prompt else None
            out.append(self.encoder(points, boxes, None))
        return out, pe


class _NoIoU(nn.Module):
    """Stands in for SAM's IoU head: the semantic task picks masks by class, so predicted IoUs are never used (and
    an unused trainable head would get no gradient)."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs = outputs

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.new_zeros(tokens.shape[0], self.outputs)


class SamHead(nn.Module):
    """Neck + SAM's mask decoder over a (B, in_channels, h, w) embedding -> (B, K+1, H, W) semantic logits."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        prompt: str = "box",
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        sam_neck: bool = True,
    ):
        super().__init__()
        modeling = require("segment_anything.modeling", "sam", "SAM's mask decoder")
        MaskDecoder, TwoWayTransformer = modeling.MaskDecoder, modeling.TwoWayTransformer
        if prompt not in PROMPTS:
            raise ConfigError(f"model.head.prompt must be one of {PROMPTS}, got {prompt!r}.")
        if num_classes < 2:
            raise ConfigError(f"the SAM head needs background and at least one class, got num_classes={num_classes}.")
        self.prompt, self.num_classes, self.image_size = prompt, num_classes, tuple(image_size)
        if in_channels == embed_dim and not sam_neck:
            self.neck: nn.Module = nn.Identity()
        else:
            self.neck = _neck(in_channels, embed_dim) if sam_neck else nn.Conv2d(in_channels, embed_dim, 1)
        transformer = TwoWayTransformer(depth=depth, embedding_dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim)
        # prompted: SAM's 3 + 1 mask tokens (an official decoder loads whole); no prompt: one token per class (SAMed)
        outputs = num_classes - 1 if prompt == "none" else 3
        self.decoder = MaskDecoder(transformer_dim=embed_dim, transformer=transformer, num_multimask_outputs=outputs)
        self.decoder.iou_prediction_head = _NoIoU(outputs + 1)

    def forward(
        self, embedding: Tensor, prompts: list[tuple[Tensor, Tensor]], pe: Tensor, present: Tensor | None = None
    ) -> Tensor:
        """``prompts`` and ``pe`` from :class:`SamPrompts`; ``present`` (B, K) marks the classes that have prompts."""
        emb = self.neck(embedding)  # (B, E, h, w)
        if tuple(emb.shape[-2:]) != tuple(pe.shape[-2:]):
            raise ConfigError(
                f"the SAM prompt encoder was built for a {tuple(pe.shape[-2:])} embedding, got "
                f"{tuple(emb.shape[-2:])}: build the model for the input size you train at."
            )
        outs = []
        for i, (sparse, dense) in enumerate(prompts):  # SAM's decoder takes one image with a batch of prompts
            masks, _ = self.decoder.predict_masks(emb[i : i + 1], pe, sparse, dense)  # (K or 1, tokens, 4h, 4w)
            if self.prompt == "none":
                outs.append(masks[0])  # (K+1, 4h, 4w): one mask token per class
                continue
            fg = masks[:, 0]  # (K, 4h, 4w): SAM's single-mask output per class
            fg = torch.where(present[i][:, None, None], fg, torch.full_like(fg, ABSENT))
            outs.append(torch.cat([torch.zeros_like(fg[:1]), fg]))  # background logit 0
        logits = torch.stack(outs)
        return F.interpolate(logits, size=self.image_size, mode="bilinear", align_corners=False)


def load_sam_decoder(prompter: SamPrompts, head: SamHead, path: str | Path) -> None:
    """Load an official SAM/MedSAM file's prompt encoder and mask decoder (per-class tensors may differ in count)."""
    from ..backbones.checkpoint import read_state_dict

    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED)}
    parts = {"prompt_encoder.": prompter.encoder, "mask_decoder.": head.decoder}
    per_class = ("mask_tokens.", "output_hypernetworks_mlps.")  # sized by the number of classes
    skipped = []
    for prefix, module in parts.items():
        own = module.state_dict()
        theirs = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not theirs:
            raise DataError(f"{path} holds no {prefix!r} tensors; it is not a full SAM checkpoint.")
        missing = sorted(k for k in own if k not in theirs and not k.startswith(per_class))
        if missing:
            raise DataError(f"{path}: {len(missing)} {prefix} tensors are missing, e.g. {missing[:5]}.")
        keep = [k for k in own if k in theirs and theirs[k].shape == own[k].shape]
        bad = [k for k in own if k in theirs and k not in keep and not k.startswith(per_class)]
        if bad:
            raise DataError(
                f"{path}: {prefix} tensors do not fit, e.g. {bad[0]} {tuple(theirs[bad[0]].shape)} vs "
                f"{tuple(own[bad[0]].shape)}: the checkpoint's SAM size differs from model.head.embed_dim."
            )
        skipped += [prefix + k for k in own if k not in keep]
        module.load_state_dict({k: theirs[k] for k in keep}, strict=False)
    if skipped:
        log.info("vpeft: SAM decoder loaded; %d per-class tensors kept at their init: %s", len(skipped), skipped[:4])
