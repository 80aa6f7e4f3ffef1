"""AdaptFormer: a parallel bottleneck beside the MLP sub-block (Chen, Ge, Tong, Wang, Song, Wang and Luo,
"AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022, arXiv:2205.13535).

    x <- x + mlp(norm2(x)) + s * W_up dropout(relu(W_down x + b_down)) + s * b_up

with ``x`` the residual stream after the attention sub-block (the official ``Block.forward`` feeds the adapter ``x``,
not ``norm2(x)``). ``W_down`` (D -> d) is Kaiming-uniform (a = sqrt(5), the code's ``init_option="lora"``);
``b_down``, ``W_up`` and ``b_up`` are zeros, so the adapted model equals the base model at initialisation. Defaults
are the VTAB-1k leaderboard setting: d = 8 (the repo's image default is 64), s = 0.1, ReLU, dropout 0.1, no adapter
LayerNorm. Parameters on ViT-B/16: 12 * (768 * 8 + 8 + 8 * 768 + 768) = 156,768. Not mergeable (ReLU).

Placement. A wrapper sees only its own module's input, and ``mlp`` sees ``norm2(x)``. To read ``x`` itself, the
default targets are ``("mlp", "mlp_norm")``, the role of ``norm2`` (GPT-2's ``ln_2``, Llama's
``post_attention_layernorm``): the wrapper on the norm (no parameters) hands its input, the residual stream,
to the adapter on the ``mlp`` of the same block, which adds ``s * f(x)`` to the MLP output. The pairing is by parent
module (``blocks.3.norm2`` feeds ``blocks.3.mlp``) and every MLP target must have its norm, or vice versa, else the
adapter is refused. With ``targets=("mlp",)`` (no norm targets) the adapter reads the MLP input ``norm2(x)`` instead:
a common reimplementation (PETL_Vision's ``ft_mlp_ln="after"``), not the official one.

Against the official code: the official adapter output is not drop-pathed; here it joins the MLP output inside the
block, so timm's drop path (when training with one) and LayerScale (absent on ViT-B) act on both together. The two
agree whenever drop path is off.

LLM-Adapters' parallel adapter. The parallel bottleneck of LLM-Adapters (Hu, Wang, Lan, Xu, Lim, Bing, Xu, Poria and
Lee, "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models", EMNLP 2023,
arXiv:2304.01933; He et al.'s parallel adapter, arXiv:2110.04366) is this computation fed the input of the sub-layer it
runs beside, ``y = f(x) + s U act(D x)``; its placements are ``targets`` without the norm tap (checked by hand on a
Llama block in ``tests/methods/test_llm_adapters.py``):

    parallel to the MLP         targets=("mlp",)        reads the MLP input norm2(x), adds to the MLP output (ViT,
                                                         GPT-2, Llama: models whose MLP is one module)
    parallel to attention       targets=("attn",)       reads the attention input norm1(x) (ViT, GPT-2, Llama)
    parallel to each Linear     targets=("mlp_in", "mlp_out")   the code's form (``use_parallel_adapter``: one adapter
                                                         beside each targeted Linear, ``W x + s U act(D x)``, D reading
                                                         the Linear's input width and U writing its output width)

The paper recommends the parallel adapter beside the MLP; its runs use a bottleneck of 256 (its code's default and
its README's setting), scale 1, tanh, no dropout and no biases:
``apply_method(model, "adaptformer", targets=("mlp",), dim=256, scale=1.0, act="tanh", dropout=0.0, bias=False)``.
Against its code (``AGI-Edgerunners/LLM-Adapters``, ``peft/src/peft/tuners/bottleneck.py``): its default init ("bert":
both projections N(0, 0.02)) does not start at the base model; here D is Kaiming-uniform and U zeros, which is its
``"mam_adapter"`` init; its learned scalar scale is not offered. BERT's feed-forward is two modules
(``intermediate``, ``output``), so "parallel to the MLP" there is the per-Linear form only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..core import AdapterModule, DropProbability, FiniteFloat, MethodConfig, PositiveInt, Target
from ..errors import ConfigError
from ._blocks import ACTIVATIONS, Taps, block_of, dropout


@dataclass
class AdaptFormerConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp", "mlp_norm")  # the norm taps the residual stream, see the module docstring
    dim: PositiveInt = 8  # bottleneck width
    scale: FiniteFloat = 0.1  # s
    dropout: DropProbability = 0.1  # after the activation
    act: Literal[tuple(ACTIVATIONS)] = "relu"  # relu (AdaptFormer), gelu, quick_gelu or tanh (LLM-Adapters)
    bias: bool = True  # biases on both projections (AdaptFormer); LLM-Adapters has none


class AdaptFormer(AdapterModule):
    Config = AdaptFormerConfig
    wraps = ("module", "linear", "norm")
    mergeable = False

    def __init__(self, target: Target, config: AdaptFormerConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.block = block_of(target)
        self.tap = target.kind == "norm"
        if self.tap:
            return  # a tap holds no tensors: it only passes the residual stream on
        width = target.out_features
        if shared.taps.active and target.in_features != width:
            raise ConfigError(f"adaptformer on {target.name!r}: the residual stream must have the width of its output.")
        self.scale = config.scale
        self.down = nn.Linear(target.in_features, config.dim, bias=config.bias)  # (dim, D_in): reads what f reads
        self.up = nn.Linear(config.dim, width, bias=config.bias)  # (D_out, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if config.bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.act]
        self.dropout = dropout(config.dropout)

    @classmethod
    def build_shared(cls, config: AdaptFormerConfig, targets: list[Target]) -> nn.Module:
        return Taps("adaptformer", targets)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        if self.tap:
            self.shared.taps.put(self.block, x)  # (B, N, D), read by the MLP of this block
            return y
        x = self.shared.taps.take(self.block, x)
        h = self.dropout(self.act(self.down(x)))  # (B, N, D_in) -> (B, N, dim)
        return y + self.scale * self.up(h)  # (B, N, D)
