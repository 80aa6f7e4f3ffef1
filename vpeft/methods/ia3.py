"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu, Tam, Muqeeth, Mohta, Huang, Bansal
and Raffel, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv:2205.05638, the T-Few recipe, section 3.3).

Learned vectors rescale three activations of every block, elementwise:

    softmax(Q (l_k * K)^T / sqrt(d)) (l_v * V)        keys and values: the output of the k and v projections
    (l_ff * gamma(W_1 x)) W_2                          the FFN's intermediate activation: the input of W_2

with every l initialised to ones, so the adapted model equals the base model at initialisation. A vector on a
projection's output is ``diag(l) W`` (and ``l * b``); on the second FFN linear's input it is ``W diag(l)``: both merge
exactly (unmerging divides by l). Parameters: ``d_k + d_v + d_ff`` per block.

Placement. ``targets`` are the scaled layers; those that also match ``feedforward`` have their *input* scaled
(``l_ff``), the others their output. vpeft's defaults are the paper's through roles: ``("k", "v", "mlp_out")`` with
``feedforward=("mlp_out",)``, which is HF PEFT's per-model default on Llama (``k_proj``, ``v_proj``, ``down_proj``).
HF PEFT's defaults differ on two model types, and the same options reproduce them exactly:

* BERT: ``targets=("key", "value", "output.dense"), feedforward=("output.dense",)``. ``output.dense`` is a suffix of
  ``attention.output.dense`` too, so PEFT also scales the input of the attention output projection (the concatenated
  heads, linear in the values: a second vector on the coordinates of ``l_v``). On all-MiniLM-L6-v2 that is
  6 * (384 + 384 + 384 + 1536) = 16,128 parameters, PEFT's count; vpeft's defaults give 6 * (384 + 384 + 1536) =
  13,824.
* GPT-2: ``targets=("attn.c_attn", "mlp.c_proj"), feedforward=("mlp.c_proj",)``: PEFT scales the whole fused
  ``c_attn`` output, the queries included (3 * 768 per block on GPT-2 small); vpeft's roles scale only its k and v
  column slices.

The official code (``r-three/t-few``: ``src/models/lora.py``, ``LoRALinear`` with ``lora_scaling_rank=1``,
``lora_rank=0``; ``configs/ia3.json``) trains output vectors (``multi_lora_b``, ones) on T5's ``k``, ``v`` and
``wi_1``: ``wi_1`` is the linear branch of T5 v1.1's gated FFN, ``wo(act(wi_0 x) * wi_1 x)``, so scaling its output is
scaling the intermediate activation, the paper's l_ff. vpeft scales the input of the FFN's second linear instead, which
is the same l_ff for gated and plain FFNs alike (BERT, GPT-2 and ViT have no linear branch to scale). Its recipe
(lr 3e-3, 1,000 steps, the unlikelihood and length-normalised losses, multitask pre-training of the vectors for T0) is
outside this layer. ViT-B/16 at the defaults: 12 * (768 + 768 + 3072) = 55,296 parameters.

Wraps Linear (and HF Conv1D) and fused-projection slices; an input (feedforward) vector on a slice is refused, as it
would rescale the input of the other slices too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core import ROLES, WHOLE, AdapterModule, MethodConfig, Target, name_matches
from ..errors import ConfigError, OptionError


@dataclass
class IA3Config(MethodConfig):
    targets: tuple[str, ...] = ("k", "v", "mlp_out")
    feedforward: tuple[str, ...] = ("mlp_out",)  # targets whose input is scaled (roles or patterns, as targets)


def is_feedforward(path: str, entries: tuple[str, ...]) -> bool:
    """Whether target ``path`` matches one of the ``feedforward`` entries (a role expands to its conventions)."""
    patterns = [p.split("[")[0] for entry in entries for p in ROLES.get(entry, (entry,))]
    return any(name_matches(path, p) for p in patterns)


class IA3(AdapterModule):
    Config = IA3Config
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: IA3Config, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        self.feedforward = is_feedforward(target.name, config.feedforward)
        if self.feedforward and target.part != WHOLE:
            raise ConfigError(
                f"ia3: feedforward entry matches {target.key!r}, a slice of a fused projection; an input vector would "
                "scale the input of every slice. Name the whole module in targets, or drop it from feedforward."
            )
        # l: (in,) on the input of a feedforward layer, (out,) on the output of the others; ones: identity at init
        self.ia3_l = nn.Parameter(torch.ones(target.in_features if self.feedforward else target.out_features))

    @classmethod
    def prepare(cls, config: IA3Config, model: nn.Module, targets: list[Target], calibration: Any) -> IA3Config:
        unused = [e for e in config.feedforward if not any(is_feedforward(t.name, (e,)) for t in targets)]
        if unused:
            raise OptionError(
                f"ia3 option feedforward entry {unused[0]!r} matches none of the targets "
                f"({', '.join(t.key for t in targets[:4])}...); feedforward names which targets get an input vector, "
                "so each entry must also be selected by targets.",
                "feedforward",
            )
        return config

    def adapt_input(self, x: Tensor) -> Tensor:
        return x * self.ia3_l if self.feedforward else x

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.feedforward else y * self.ia3_l

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        l = self.ia3_l.to(weight.dtype)  # noqa: E741  the paper's name
        if self.feedforward:  # W diag(l): scale the input columns; the bias is added after the matmul
            return weight * l, bias
        return weight * l[:, None], None if bias is None else bias * l.to(bias.dtype)

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        l = self.ia3_l.to(weight.dtype)  # noqa: E741
        if self.feedforward:
            return weight / l, bias
        return weight / l[:, None], None if bias is None else bias / l.to(bias.dtype)
