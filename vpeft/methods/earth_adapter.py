"""Earth-Adapter: a mixture of frequency adapters after every block (Hu, Gong, Wang, Jia, Luo and Yang,
"Earth-Adapter: Bridge the Geospatial Domain Gaps with Mixture of Frequency Adaptation", arXiv:2504.06220).

Placed where Rein sits: after each block's output, on the patch tokens f (H x W grid, width C). The prefix (class,
register) tokens are left out of the FFT and the router: they take the raw path t <- t + s_l E1_l(t) (default,
``adapt_prefix=True``) or pass unchanged (``adapt_prefix=False``, the official code, built for a segmentation head
that reads the patch tokens only; with a class-token head the last block's adapter would then have no effect).
With E(u) = W_2 ReLU(W_1 u + b_1) + b_2 (C -> d -> C):

    plain block:      f <- f + s_l E1_l(f)
    frequency block:  F = fftshift(fft2(f on the H x W grid, ortho)),  M = 1 on the centred box
                      rows [H//2 - c_H, H//2 + c_H), cols [W//2 - c_W, W//2 + c_W),  c_n = max(1, int(n * rho // 2))
                      f_low = Re ifft2(ifftshift(F M)),  f_high = Re ifft2(ifftshift(F (1 - M)))   (f_low + f_high = f)
                      g = softmax(W_r f + b_r)  (per token, 3 experts: raw, low, high)
                      f <- f + s_l (g_1 E1_l(f) + g_2 E2_l(f_low) + g_3 E3_l(f_high))

Dense soft mixture, no top-k, no balancing loss. s_l is one learnable scalar per block, initialised to 0.1; all expert
and router weights have PyTorch's Linear init (the official kaiming_uniform(a=sqrt(5))), so the adapter is active from
step 0 and the model does not equal the base model at initialisation. Not mergeable.

Defaults: d = 64 and rho = 0.3 (the official DG V2P / DG R2U configs, whose frequency blocks are 0-5 of 24);
``fft_layers`` None means the first quarter of the adapted blocks, rounded up (0-5 of 24, 0-2 of 12). The official
configs tune d in {16, 24, 32, 64}, rho in {0.2, 0.3} and the first or last 3-6 blocks per benchmark.
``fft_layers`` counts adapted blocks (0 = the first target; negative from the end) and is stored resolved.

Parameters, with E = 2 C d + d + C and F frequency blocks of L: L E + F (2 E + 3 C + 3) + L. On ViT-B/16 (C = 768,
L = 12, F = 3, d = 64): E = 98,304 + 64 + 768 = 99,136; 12 * 99,136 + 3 * (198,272 + 2,307) + 12 = 1,791,381.

Against the official code (``VisionXLab/Earth-Adapter``, ``earth_adapter.py``):
* It hard-codes a 32 x 32 token grid, C = 1024 and 24 layers. Here the grid (H, W), which need not be square, and the
  number of prefix tokens are read from the model in ``prepare`` (timm ``patch_embed.grid_size`` and
  ``num_prefix_tokens``) or given as options, and stored in the config; C and the depth come from the targets.
* The low-pass half-width is at least 1 (the zero frequency stays low); the official formula gives 0 below n = 4/rho
  tokens, which never happens on its 32 x 32 grid, so the official setting is unchanged.
* On a non-square grid each axis gets its own half-width (c_H from H, c_W from W), so the low-pass box keeps the
  same fraction rho of both axes. The official code cannot run such grids (it reshapes the tokens to 32 x 32); its
  formula, one ``int(min(H, W) * rho // 2)`` for both axes, agrees with this on square grids (but for the
  floor of 1 above).
* The second and third experts and the router exist only in the frequency blocks; the code allocates them for all 24
  layers and never uses most of them (they count in its logged totals, with 24 leftover LayerNorms).
* Prefix tokens take the raw path by default (``adapt_prefix``); the code leaves the class token unchanged.
* The uninitialised ``refine_token`` option (``with_token``, unused by every config) is left out.

Versus Rein: per-block (not shared) ReLU bottlenecks with per-block scales instead of Rein's shared token attention
and single scale 1e-3, the frequency experts, and no token-to-query link to the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core import AdapterModule, FiniteFloat, MethodConfig, NonNegativeInt, PositiveInt, ProperFraction, Target
from ..errors import ConfigError
from ._blocks import require_patch_grid


@dataclass
class EarthAdapterConfig(MethodConfig):
    targets: tuple[str, ...] = ("block",)
    dim: PositiveInt = 64  # d, the expert bottleneck
    cutoff_ratio: ProperFraction = 0.3  # rho
    fft_layers: tuple[int, ...] | None = None  # positions among the adapted blocks; None: the first quarter
    scale_init: FiniteFloat = 0.1  # s_l at initialisation
    grid: tuple[PositiveInt, PositiveInt] | None = None  # (H, W) token grid; read from the model when None
    num_prefix_tokens: NonNegativeInt | None = None  # class/register tokens before the grid; None: read from the model
    adapt_prefix: bool = True  # prefix tokens take the raw path f + s E1(f); False leaves them as the official code


def resolve_fft_layers(config: EarthAdapterConfig, count: int) -> tuple[int, ...]:
    """The frequency blocks as sorted positions in ``[0, count)``."""
    if config.fft_layers is None:
        return tuple(range(math.ceil(count / 4)))
    bad = [i for i in config.fft_layers if not -count <= i < count]
    if bad:
        raise ValueError(f"earth_adapter option fft_layers {bad} out of range for {count} adapted blocks.")
    return tuple(sorted({i % count for i in config.fft_layers}))


def low_pass_mask(h: int, w: int, ratio: float) -> Tensor:
    """The official centred low-pass box on the fftshift-ed (h, w) spectrum, 1 inside and 0 outside."""
    mask = torch.zeros(h, w)
    ch, cw = max(1, int(h * ratio // 2)), max(1, int(w * ratio // 2))
    mask[max(0, h // 2 - ch) : h // 2 + ch, max(0, w // 2 - cw) : w // 2 + cw] = 1.0
    return mask


def frequency_split(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Low and high parts of ``x`` (B, C, H, W) under the shifted-spectrum ``mask`` (H, W); they sum to ``x``."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
    low = torch.fft.ifft2(torch.fft.ifftshift(spec * mask, dim=(-2, -1)), norm="ortho").real
    high = torch.fft.ifft2(torch.fft.ifftshift(spec * (1 - mask), dim=(-2, -1)), norm="ortho").real
    return low.to(x.dtype), high.to(x.dtype)


def _expert(width: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, dim), nn.ReLU(), nn.Linear(dim, width))  # PyTorch init, as the official code


class EarthAdapter(AdapterModule):
    Config = EarthAdapterConfig
    wraps = ("module",)
    mergeable = False
    identity_at_init = False  # the experts' up projections are not zero; s = 0.1 only damps them

    def __init__(self, target: Target, config: EarthAdapterConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        if config.grid is None or config.num_prefix_tokens is None:
            raise ValueError("earth_adapter needs grid and num_prefix_tokens (prepare() reads them from the model).")
        self.grid, self.prefix = tuple(config.grid), config.num_prefix_tokens
        self.adapt_prefix = config.adapt_prefix
        width = target.out_features
        self.scale = nn.Parameter(torch.tensor(float(config.scale_init)))  # s_l
        self.expert1 = _expert(width, config.dim)
        self.frequency = target.position in resolve_fft_layers(config, target.count)
        if self.frequency:
            self.expert2, self.expert3 = _expert(width, config.dim), _expert(width, config.dim)
            self.router = nn.Linear(width, 3)
            self.register_buffer("mask", low_pass_mask(*self.grid, config.cutoff_ratio), persistent=False)

    @classmethod
    def prepare(
        cls, config: EarthAdapterConfig, model: nn.Module, targets: list[Target], calibration: Any
    ) -> EarthAdapterConfig:
        grid, prefix = config.grid, config.num_prefix_tokens
        if grid is None:
            require_patch_grid(
                "earth_adapter", model, "splits the patch tokens into frequency bands on their 2-D grid (grid=(H, W))"
            )
        # the timm ViT itself, or the one inside a task model (a segmentation model's backbone.model)
        vit = next((m for m in model.modules() if hasattr(getattr(m, "patch_embed", None), "grid_size")), None)
        if grid is None:
            if vit is None:
                raise ConfigError(
                    "earth_adapter needs the token grid: the model has no patch_embed.grid_size (timm); "
                    "pass grid=(H, W) and num_prefix_tokens=..."
                )
            grid = (int(vit.patch_embed.grid_size[0]), int(vit.patch_embed.grid_size[1]))
        if prefix is None:
            prefix = getattr(vit, "num_prefix_tokens", None)
            if prefix is None:
                raise ConfigError(
                    "earth_adapter: the model has no num_prefix_tokens (timm); pass num_prefix_tokens=..."
                )
            prefix = int(prefix)
        return replace(config, grid=grid, num_prefix_tokens=prefix, fft_layers=resolve_fft_layers(config, len(targets)))

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        (h, w), k = self.grid, self.prefix
        if y.dim() != 3 or y.shape[1] != k + h * w:
            raise ValueError(
                f"earth_adapter expects (B, {k} + {h}*{w}, C) block outputs (grid {self.grid}, {k} prefix tokens), "
                f"got {tuple(y.shape)}; pass grid=/num_prefix_tokens= for this input size."
            )
        f = y[:, k:]  # (B, H*W, C)
        delta = self.expert1(f)
        if self.frequency:
            grid = f.transpose(1, 2).unflatten(-1, (h, w))  # (B, C, H, W)
            low, high = (t.flatten(2).transpose(1, 2) for t in frequency_split(grid, self.mask))  # (B, H*W, C)
            g = torch.softmax(self.router(f), dim=-1)  # (B, H*W, 3)
            delta = g[..., :1] * delta + g[..., 1:2] * self.expert2(low) + g[..., 2:] * self.expert3(high)
        out = f + self.scale * delta
        if k == 0:
            return out
        cls = y[:, :k]  # (B, k, C): no grid position, so no frequencies; the raw expert alone, or unchanged
        cls = cls + self.scale * self.expert1(cls) if self.adapt_prefix else cls
        return torch.cat([cls, out], dim=1)
