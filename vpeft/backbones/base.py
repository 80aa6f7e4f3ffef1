"""One interface over ViT-family image encoders from timm, open_clip and segment_anything.

A :class:`Backbone` wraps the library's own module as ``self.model`` (methods adapt it in place, so module names stay
the library's: ``model.blocks.3.attn.qkv``) and answers what heads and data pipelines need:

- ``features(x, indices)``: the outputs of the chosen blocks as (B, C, h, w) maps, for dense heads;
- ``forward(x)``: the final token sequence (B, N, C) (prefix tokens first, then the h * w patch tokens);
- ``pool(tokens, kind)``: a (B, C) vector (class token, average of the patch tokens, or both concatenated);
- ``embed_dim`` (width of the block features), ``out_dim`` (width of ``forward``/``pool``: ``embed_dim``, or the
  neck's channels for SAM), ``patch_size``, ``num_prefix_tokens``, ``depth``, ``grid(size)``, ``input_size`` (the
  one input size a model with a fixed position grid takes; ``None`` when any multiple of the patch size works);
- ``data_config``: the pretrained normalisation (input_size, mean, std, interpolation, crop_pct) that the data
  transforms follow.

Block outputs are read with forward hooks while the library's own forward runs, so gradient checkpointing, prompt
tokens (VPT) and whatever the library does between blocks keep working. The patch tokens are the last h * w tokens of
a block's output: prefix (class, register) tokens and prompts sit before them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

POOLS = ("token", "avg", "both")


class Backbone(nn.Module):
    """Base class: subclasses set the attributes below and implement :meth:`run` and :meth:`blocks`."""

    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    data_config: dict[str, Any]
    input_size: tuple[int, int] | None = None

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # -- what a family provides --------------------------------------------------------------------------------
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order (their outputs are the features)."""
        raise NotImplementedError

    def run(self, x: Tensor) -> Tensor:
        """The library's forward up to the final token sequence (B, N, C), or (B, C, h, w) for grid encoders."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks in the backward pass instead of storing their activations."""
        raise NotImplementedError

    # -- one implementation for every family -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks())

    @property
    def out_dim(self) -> int:
        """Width of :meth:`forward`'s tokens and of ``pool(..., "token" | "avg")``."""
        return self.embed_dim

    def check_input(self, x: Tensor) -> None:
        """Raise for an image the backbone cannot take: a side not a multiple of the patch, or another fixed grid."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} takes (B, C, H, W) images, got shape {tuple(x.shape)}.")
        size, p = tuple(x.shape[-2:]), self.patch_size
        if size[0] % p or size[1] % p:
            fit = tuple(max(p, round(s / p) * p) for s in size)
            raise ConfigError(
                f"input size {size[0]}x{size[1]} is not a multiple of the patch size {p} of {type(self).__name__}; "
                f"resize or pad to a multiple, e.g. {fit[0]}x{fit[1]}."
            )
        if self.input_size is not None and size != tuple(self.input_size):
            h, w = self.grid(self.input_size)
            raise ConfigError(
                f"input size {size[0]}x{size[1]} (grid {size[0] // p}x{size[1] // p}) differs from the "
                f"{self.input_size[0]}x{self.input_size[1]} (grid {h}x{w}) that this {type(self).__name__} was built "
                f"for, and its position embedding has a fixed grid. Build it with img_size={size[0]} (model.img_size):"
                " a checkpoint's position embedding is then interpolated to the new grid when it loads."
            )

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) of an input of ``size`` (H, W)."""
        return size[0] // self.patch_size, size[1] // self.patch_size

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.run(x)

    def features(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Outputs of blocks ``indices`` (negative counts from the end) as (B, embed_dim, h, w) maps."""
        wanted = self._resolve(indices)
        self.check_input(x)
        h, w = self.grid(tuple(x.shape[-2:]))
        found: dict[int, Tensor] = {}

        def keep(i: int):
            def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
                found[i] = output[0] if isinstance(output, tuple) else output  # HF layers: (hidden, extras...)

            return hook

        blocks = self.blocks()
        handles = [blocks[i].register_forward_hook(keep(i)) for i in sorted(set(wanted))]
        try:
            self.run(x)
        finally:
            for handle in handles:
                handle.remove()
        return [self._as_map(found[i], h, w) for i in wanted]

    def pool(self, tokens: Tensor, kind: str = "token") -> Tensor:
        """(B, N, C) tokens -> (B, C) (``token``, ``avg`` over the patch tokens) or (B, 2C) (``both``)."""
        if kind not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {kind!r}.")
        if tokens.dim() == 4:  # a grid encoder's (B, C, h, w): only the average exists
            if kind != "avg":
                raise ConfigError(f"{type(self).__name__} has no class token; use pool='avg'.")
            return tokens.mean(dim=(2, 3))
        prefix = self.num_prefix_tokens
        if kind != "avg" and prefix == 0:
            raise ConfigError(f"{type(self).__name__} has no class token; use pool='avg'.")
        cls, avg = tokens[:, 0], tokens[:, prefix:].mean(dim=1)
        if kind == "token":
            return cls
        return avg if kind == "avg" else torch.cat([cls, avg], dim=-1)

    def _resolve(self, indices: Sequence[int]) -> list[int]:
        depth = self.depth
        bad = [i for i in indices if not -depth <= i < depth]
        if bad or not indices:
            raise ConfigError(
                f"feature indices {list(indices)} do not fit a backbone with {depth} blocks; use 0..{depth - 1} "
                "(or negative indices from the end)."
            )
        return [i % depth for i in indices]

    def _as_map(self, out: Tensor, h: int, w: int) -> Tensor:
        if out.dim() == 4:  # (B, h, w, C) grid blocks (SAM)
            return out.permute(0, 3, 1, 2).contiguous()
        if out.shape[1] < h * w:
            raise ValueError(f"a block output has {out.shape[1]} tokens, fewer than the {h}x{w} patch grid.")
        patches = out[:, -h * w :]  # (B, h*w, C): prompts and prefix tokens come first
        return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)  # (B, C, h, w)
