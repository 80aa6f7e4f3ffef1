"""RepAdapter: a linear adapter re-parameterised into the next projection (Luo, Huang, Zhou, Sun, Jiang, Wang and Ji,
"Towards Efficient Visual Adaption via Structural Re-parameterization", arXiv:2302.08106).

    x' = x + s * B(dropout(A x + a)) + s * b_B,    A in R^{h x d} (Xavier-uniform), a = 0,
                                                    B grouped (groups = 2) in R^{d x h/2} per group, b_B = 0

placed sequentially on the *input* of ``attn.qkv`` and ``mlp.fc1`` (the official "repblock": ``attn(adapter(norm1(x)))``
and ``mlp(adapter(norm2(x)))``). B and its bias start at zero, so the model is the base model at initialisation.
With groups = 2, output channels ``[g d/2, (g+1) d/2)`` of B read only hidden channels ``[g h/2, (g+1) h/2)`` (the
official ``Conv1d(h, d, 1, groups=2)``). Defaults: ``scripts/train_repblock.sh`` (dim 8, groups 2, dropout 0.1 between
A and B, ``sparse_lambda = 0``, i.e. no L2 penalty on B); the scale is set per task in ``configs/repblock/<task>.yaml``
(dtd 1, caltech101 5, kitti 5, svhn 10; PETL_Vision searches {0.1, 0.5, 1, 5, 10}); the default here is 1.
ViT-B/16 count: 2 * 12 * (768 * 8 + 8 + 768 * 4 + 768) = 239,808 (the paper's 0.22M = 221,184 leaves out the biases).

Mergeable and exact (the official ``reparameterize``): with the dense block-diagonal ``B_dense`` (d x h),
``G = B_dense A`` and ``g = B_dense a + b_B``, the following layer becomes ``W' = W (I + s G)``, ``b' = b + s W g``.
``unmerged`` solves ``W (I + s G) = W'`` for ``W`` (in float64). When the following layer has no bias, the adapter
has none either (A and B bias-free), so that the merge stays exact; official ViTs always have one.
Dropout is applied only when its rate is positive and the module is training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import WHOLE, AdapterModule, DropProbability, FiniteFloat, MethodConfig, PositiveInt, Target
from ..errors import ConfigError, OptionError
from ._blocks import dropout


@dataclass
class RepAdapterConfig(MethodConfig):
    targets: tuple[str, ...] = ("qkv", "mlp_in")  # inputs of attn.qkv and mlp.fc1
    dim: PositiveInt = 8  # hidden width h
    groups: PositiveInt = 2  # groups of the up projection B
    scale: FiniteFloat = 1.0  # s
    dropout: DropProbability = 0.1

    def check(self) -> None:
        if self.dim % self.groups:
            raise OptionError(f"repadapter option groups must divide dim={self.dim}, got {self.groups}.", "groups")


class RepAdapter(AdapterModule):
    Config = RepAdapterConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: RepAdapterConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        d, h, g = target.in_features, config.dim, config.groups
        if d % g:
            raise ConfigError(f"repadapter: groups={g} must divide the input width {d} of {target.name!r}.")
        self.scale, self.groups = config.scale, g
        has_bias = getattr(target.module, "bias", None) is not None
        self.down = nn.Parameter(torch.empty(h, d))  # A (h, d)
        self.down_bias = nn.Parameter(torch.zeros(h)) if has_bias else None  # a (h,)
        self.up = nn.Parameter(torch.zeros(d, h // g))  # B (d, h/g): rows [k d/g, (k+1) d/g) form group k
        self.up_bias = nn.Parameter(torch.zeros(d)) if has_bias else None  # b_B (d,)
        nn.init.xavier_uniform_(self.down)
        self.dropout = dropout(config.dropout)

    @classmethod
    def accepts(cls, target: Target, config: RepAdapterConfig) -> bool:
        """whole layers, not slices of a fused projection (the adapter changes the input the whole layer reads)."""
        return target.part == WHOLE

    def _up(self, z: Tensor) -> Tensor:
        g, d = self.groups, self.up.shape[0]
        zg = z.unflatten(-1, (g, -1))  # (..., h) -> (..., g, h/g)
        out = torch.einsum("...gk,gok->...go", zg, self.up.view(g, d // g, -1))  # (..., g, d/g)
        out = out.flatten(-2)  # (..., d)
        return out + self.up_bias if self.up_bias is not None else out

    def adapt_input(self, x: Tensor) -> Tensor:
        return x + self.scale * self._up(self.dropout(F.linear(x, self.down, self.down_bias)))

    def linear_map(self) -> tuple[Tensor, Tensor]:
        """``(G, g)`` with ``adapt_input(x) = x + s (G x + g)`` in eval mode: ``G`` (d, d), ``g`` (d,)."""
        g, d = self.groups, self.up.shape[0]
        dense = torch.block_diag(*self.up.view(g, d // g, -1))  # (d, h), block-diagonal
        bias = self.down_bias if self.down_bias is not None else self.down.new_zeros(self.down.shape[0])
        up_bias = self.up_bias if self.up_bias is not None else self.up.new_zeros(d)
        return dense @ self.down, dense @ bias + up_bias

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        G, g = (t.to(weight.dtype) for t in self.linear_map())
        new_b = None if bias is None else bias + self.scale * (weight @ g).to(bias.dtype)
        return weight + self.scale * (weight @ G), new_b  # W (I + s G), b + s W g

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        G, g = (t.double() for t in self.linear_map())
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        # W (I + s G) = W'  <=>  (I + s G)^T W^T = W'^T
        w = torch.linalg.solve((eye + self.scale * G).T, weight.double().T).T
        new_b = None if bias is None else (bias.double() - self.scale * (w @ g)).to(bias.dtype)
        return w.to(weight.dtype), new_b
