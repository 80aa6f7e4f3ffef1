"""Adapter: a sequential bottleneck on the MLP output, the VTAB-1k "Adapter" row (Houlsby, Giurgiu, Jastrzebski,
Morrone, de Laroussilhe, Gesmundo, Attariyan and Gelly, "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv:1902.00751), in the configuration of the NOAH leaderboard (Zhang, Zhou and Liu, "Neural Prompt Search",
arXiv:2206.04673, Table 1, 0.16M).

    y = mlp(norm2(x));    y' = y + W_up dropout(act(W_down y + b_down)) + b_up;    x <- x + y'

``W_down`` in R^{d x D} is Xavier-uniform; ``W_up`` in R^{D x d} and both biases are zeros, so the adapted model
equals the base model at initialisation. Defaults are NOAH's: bottleneck d = 8 on the MLP of every block only,
QuickGELU (``x * sigmoid(1.702 x)``), dropout 0.1 between the activation and the up projection. Parameters on
ViT-B/16: 12 * (768 * 8 + 8 + 8 * 768 + 768) = 156,768. Not mergeable (the activation sits between the projections).

Where this follows the paper rather than the code:
* Init. NOAH builds the adapter with Xavier weights, but the ViT constructor then re-initialises every Linear
  (adapter included) to trunc_normal(0.02), so its adapter is only near-identity at step 0. We follow the paper's
  identity-at-init intent exactly: Xavier down projection, zero up projection and zero biases.
* Placement. Houlsby places adapters after both the attention and the FFN sublayers; the leaderboard row (and this
  default) uses the MLP only. Add the ``attn`` role to ``targets`` for the paper's two adapters per block.
* NOAH applies the adapter after ``drop_path(mlp(.))``; here it wraps the MLP, so timm's drop path (if any) acts on
  the adapted output. The two agree whenever drop path is off (evaluation, or drop_path_rate 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, MethodConfig, PositiveInt, Target
from ._blocks import ACTIVATIONS, dropout


@dataclass
class AdapterConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp",)
    dim: PositiveInt = 8  # bottleneck width
    act: Literal[tuple(ACTIVATIONS)] = "quick_gelu"  # quick_gelu (NOAH), gelu or relu
    dropout: DropProbability = 0.1  # between the activation and the up projection


class Adapter(AdapterModule):
    Config = AdapterConfig
    wraps = ("module", "linear")
    mergeable = False

    def __init__(self, target: Target, config: AdapterConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        width = target.out_features  # the adapter reads and writes the wrapped module's output
        self.down = nn.Linear(width, config.dim)  # (dim, D)
        self.up = nn.Linear(config.dim, width)  # (D, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.act]
        self.dropout = dropout(config.dropout)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.up(self.dropout(self.act(self.down(y))))  # (B, N, D) -> (B, N, dim) -> (B, N, D)
