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

LLM-Adapters' series adapter. The series ("AdapterH") bottleneck of LLM-Adapters (Hu, Wang, Lan, Xu, Lim, Bing, Xu,
Poria and Lee, "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models", EMNLP
2023, arXiv:2304.01933) is this computation, ``y' = y + U act(D y)`` on a sub-layer's output ``y``; its placements are
``targets``, the same on ViT, BERT, GPT-2 and Llama (checked by hand on a Llama block in
``tests/methods/test_llm_adapters.py``):

    after the MLP         targets=("mlp_out",)              the output of the MLP's last projection, the MLP's output
                                                             (``"mlp"``, the default, wraps the whole MLP where it is
                                                             one module: ViT, GPT-2, Llama; the same output)
    after attention       targets=("attn_out",)             the attention's output projection (or ``"attn"``, the
                                                             attention module, where the model has one)
    after both            targets=("attn_out", "mlp_out")   Houlsby's two adapters per block

The paper's recommended placement for a series adapter is the first, after the MLP; its runs use a bottleneck of 256
(its code's default and its README's setting), tanh and no dropout, and its code has no biases:
``apply_method(model, "adapter", targets=("mlp_out",), dim=256, act="tanh", dropout=0.0, bias=False)``. Against its
code (``AGI-Edgerunners/LLM-Adapters``, ``peft/src/peft/tuners/bottleneck.py``): its default init ("bert": both
projections N(0, 0.02)) does not start at the base model, so here D is Xavier and U zeros as above (its
``"mam_adapter"`` init, Kaiming D and zero U, starts at the base model too); its learned scalar scale is not offered
(its default scale is 1, as here); and for Llama its series mapping also puts an adapter in front of ``gate_proj`` and
``up_proj`` (``W (x + h(x))``, ``mh_adapter``), which the paper does not describe and which is not offered here.
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
    act: Literal[tuple(ACTIVATIONS)] = "quick_gelu"  # quick_gelu (NOAH), gelu, relu or tanh (LLM-Adapters)
    dropout: DropProbability = 0.1  # between the activation and the up projection
    bias: bool = True  # biases on both projections (NOAH); LLM-Adapters has none


class Adapter(AdapterModule):
    Config = AdapterConfig
    wraps = ("module", "linear")
    mergeable = False

    def __init__(self, target: Target, config: AdapterConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        width = target.out_features  # the adapter reads and writes the wrapped module's output
        self.down = nn.Linear(width, config.dim, bias=config.bias)  # (dim, D)
        self.up = nn.Linear(config.dim, width, bias=config.bias)  # (D, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)
        if config.bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.act]
        self.dropout = dropout(config.dropout)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.up(self.dropout(self.act(self.down(y))))  # (B, N, D) -> (B, N, dim) -> (B, N, D)
