"""The medical segmentation model: a 2D image encoder (SAM or ViT, any vpeft Backbone) and one head.

Inputs are the preprocessed intensities in [0, 1] with the data's channels; the model repeats a single channel to the
encoder's three and applies the encoder's own mean and std (SAM's pixel statistics for a SAM encoder), so the data
pipeline knows nothing of the backbone. Volumes (B, C, X, Y, Z) are encoded slice by slice along ``axis`` (the
slices fold into the batch) and the block features are stacked back into (B, E, x, y, Z)-shaped maps, with the slice
axis at full resolution, for the 3D UNETR decoder.

Heads: ``sam`` (:class:`~vpeft.heads.sam.SamHead`, 2D, optional prompts), ``unetr``
(:class:`~vpeft.heads.unetr.UnetrDecoder`, 2D or 3D) and ``light`` (the linear head of
:mod:`vpeft.heads.segmentation`: BatchNorm + 1x1 conv on the patch features, upsampled; 2D). ``get_classifier()``
returns the head, which the PEFT core trains beside the method's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Backbone
from ..errors import ConfigError
from ..heads.sam import Prompts, SamPrompts

HEAD_KINDS = ("sam", "unetr", "light")


def encoder_channels(backbone: Backbone) -> int:
    """Input channels of the encoder's patch embedding."""
    return int(backbone.model.patch_embed.proj.in_channels)


def embedding_channels(backbone: Backbone) -> int:
    """Channels of ``backbone(x)`` as a map: a SAM neck's output width, else the token width."""
    if hasattr(backbone, "out_dim"):
        return int(backbone.out_dim)
    neck = getattr(backbone.model, "neck", None)  # timm samvit_*: the neck ends in its channels
    if isinstance(neck, nn.Sequential) and isinstance(neck[0], nn.Conv2d):
        return int(neck[0].out_channels)
    return int(backbone.embed_dim)


class MedicalSegmenter(nn.Module):
    """``backbone`` + ``head`` (``kind``); forward(images, prompts=None) -> logits (B, num_classes, *spatial)."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        kind: str,
        data_channels: int,
        indices: Sequence[int] = (-1,),
        spatial_dims: int = 2,
        axis: int = 2,
        prompter: SamPrompts | None = None,
    ):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(f"model.head.name must be one of {HEAD_KINDS}, got {kind!r}.")
        self.backbone, self.head, self.kind = backbone, head, kind
        self.indices, self.spatial_dims, self.axis = list(indices), spatial_dims, axis
        if (kind == "sam") != (prompter is not None):
            raise ConfigError("the sam head needs its prompt encoder (prompter), and only the sam head takes one.")
        self.prompter = prompter  # frozen: part of the base model, not of the trained head
        want = encoder_channels(backbone)
        if data_channels not in (1, want):
            raise ConfigError(
                f"the data has {data_channels} channels (channels x (2 context + 1)) and the encoder takes {want}; "
                f"a single channel is repeated, any other count must equal the encoder's (model.kwargs.in_chans: "
                f"{data_channels}; its patch embedding is then trained from scratch unless the checkpoint has it)."
            )
        self.repeat = want if data_channels == 1 else 1
        config = backbone.data_config
        mean = torch.tensor(config.get("mean", (0.0,) * want), dtype=torch.float32)[:want]
        std = torch.tensor(config.get("std", (1.0,) * want), dtype=torch.float32)[:want]
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, images: Tensor, prompts: Prompts | None = None) -> Tensor:
        volume = images.dim() == 5
        if volume != (self.spatial_dims == 3):
            raise ValueError(f"the model was built for {self.spatial_dims}-D inputs, got shape {tuple(images.shape)}.")
        x = self._fold(images) if volume else images  # (N, C, a, b)
        x = (x.repeat(1, self.repeat, 1, 1) - self.mean) / self.std
        if self.kind == "sam":
            emb = self._embedding(x)
            embeds, pe = self.prompter(emb.shape[0], prompts)
            return self.head(emb, embeds, pe, None if prompts is None else prompts.present)
        feats = self.backbone.features(x, self.indices)  # each (N, E, h, w)
        if self.kind == "light":
            return F.interpolate(self.head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if volume:
            feats = [self._unfold(f, images.shape[0]) for f in feats]
            x = self._unfold(x, images.shape[0])
        return self.head(feats, x)

    def _embedding(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        if out.dim() == 4:  # a SAM encoder's neck output (N, C, h, w)
            return out
        h, w = self.backbone.grid(tuple(x.shape[-2:]))
        return out[:, -h * w :].transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)  # patch tokens as a map

    def _fold(self, images: Tensor) -> Tensor:
        """(B, C, X, Y, Z) -> (B * D, C, a, b): slices along ``axis`` into the batch."""
        x = images.movedim(self.axis + 2, 1)  # (B, D, C, a, b)
        return x.reshape(-1, *x.shape[2:])

    def _unfold(self, x: Tensor, batch: int) -> Tensor:
        """(B * D, E, h, w) -> (B, E, ...) with D back at the slice axis."""
        x = x.reshape(batch, -1, *x.shape[1:])  # (B, D, E, h, w)
        return x.movedim(1, self.axis + 2)
