"""MEFT: memory-efficient fine-tuning by making the pre-trained model reversible (Liao, Tan and Monz, "Make
Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning", NeurIPS 2023, arXiv:2306.00477; code
BaohaoLiao/mefts, ``models/modeling_revbert.py``).

A BERT encoder's layers are rewritten into reversible couplings (MEFT3, the variant with lambda = beta = 0.1): each
layer's attention block is F and its feed-forward block is G, each with a bottleneck adapter inside,

    [x1, x2] = [h, h]                                   (the embeddings, duplicated)
    y1 = lambda x1 + F(x2),   F(x) = LN_a(x + a + Ad_a(a)),  a = dropout(W_o SelfAttn(x))        (series adapter)
    y2 = beta x2 + G(y1),     G(x) = LN_f(x + dropout(W_2 act(W_1 x)) + Ad_f(x))                  (parallel adapter)
    output (x1 + x2) / 2 after the last layer;   Ad(x) = W_up dropout(act(W_down x + b_down)) + b_up

and the backward pass recomputes each layer's inputs from its outputs, x2 = (y2 - G(y1)) / beta and
x1 = (y1 - F(x2)) / lambda (vpeft/methods/_reversible.py), so the activations kept for it do not grow with the depth:
the stack keeps its final outputs, and one layer's recomputation graph lives at a time. Only the adapters train.
Random draws (dropout) of each F and G are replayed when the backward pass recomputes them, so the gradients are
those of the forward pass that ran. With ``reversible=false`` the same computation runs through autograd, every
activation kept (the reference the gradients are tested against; the official code's ``num_rev_layers=0``).

Defaults are the official script's MEFT3 setting (``scripts/bert_glue.sh``): lambda = beta = 0.1, adapter bottleneck
8, the adapters' dropout 0.1 (BERT's hidden dropout) and activation BERT's (GELU). The paper's point is the
pre-trained sub-blocks staying close to themselves: F and G equal BERT's attention and feed-forward blocks exactly at
initialisation, the network does not (y1 = 0.1 h + F(h) where BERT has F(h)), so the output at initialisation differs
from BERT's and fine-tuning recovers it.

Departures: the adapters' up-projection starts at zero (the official code draws both projections from N(0, 0.02)), so
F and G are exactly BERT's blocks at the start; the coupling is built from the model's own modules (no copy of BERT's
code), as one autograd function over the whole stack whose backward recomputes layer by layer. BERT-style encoders
only (the official code is BERT only): an HF ``BertEncoder``-like module (``layer[i].attention.self``,
``.attention.output``, ``.intermediate``, ``.output``) without cross-attention; other models are refused.

Numerics (measured, ``python V-PEFT-Bench/perf/meft_memory.py --depths 2 4 8 12 24 --minilm-drift 0.1,0.1 0.1,1
1,0.1 0.5,0.5 1,1``, results in V-PEFT-Bench/perf/results/cpu-tiny-bert-meft-memory.md): each recomputation divides
a difference by lambda and beta, so a rounding error grows by about (Lip F)(Lip G) / (lambda beta) per layer going
down. In float64 the gradients equal autograd's (tests); in float32 at lambda = beta = 0.1 they do not: the relative
error of the adapters' gradients is 1e-5 with 2 layers of a random BERT, 0.1 with 4, above 1 with 8 and NaN with 24,
and 2.1 on the pre-trained 6-layer all-MiniLM-L6-v2 (7.6e-2 at lambda = 0.1, beta = 1; 2.0e-2 at 1, 0.1; 1.1e-4 at
0.5, 0.5; 3.2e-6 at 1, 1). Train with the defaults in float64, or in float32 with lambda and beta near 1 or with
only the lower layers reversible (``reversible_layers``, the official ``num_rev_layers``; the upper layers then keep
their activations as autograd does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import (
    AdapterModule,
    DropProbability,
    MethodConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Target,
    walk,
)
from ..deps import require
from ..errors import ConfigError
from ._reversible import plain, reversible


@dataclass
class MEFTConfig(MethodConfig):
    targets: tuple[str, ...] = ("encoder",)  # the BERT encoder (``bert.encoder``), rewritten as a whole
    bottleneck: PositiveInt = 8
    lam: PositiveFloat = 0.1  # lambda, the factor of x1
    beta: PositiveFloat = 0.1  # the factor of x2
    dropout: DropProbability = 0.1  # inside the adapters
    reversible: bool = True  # False: the same coupling through autograd (every activation kept)
    reversible_layers: NonNegativeInt | None = None  # the lower layers that run reversibly (None: all; official
    # num_rev_layers): the upper ones keep their activations, fewer divisions by lambda and beta in the backward pass


class Adapter(nn.Module):
    """A bottleneck adapter, ``W_up dropout(GELU(W_down x + b_down)) + b_up``; W_up and b_up start at zero."""

    def __init__(self, width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            self.down.weight.normal_(0.0, 0.02)  # BERT's initializer range, as the official code
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(F.gelu(self.down(x))))


class Half(nn.Module):
    """F or G of one layer: ``fn`` over the modules it reads (so that ``parameters()`` finds their trainable
    tensors), replaying its forward pass's random draws when it runs again with gradients (the recomputation)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.fn = fn
        self.rng: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        devices = [x.device] if x.device.type == "cuda" else []
        if torch.is_grad_enabled() and self.rng is not None:  # the backward pass's recomputation: the same draws
            cpu, gpu = self.rng
            self.rng = None
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(cpu)
                if gpu is not None:
                    torch.cuda.set_rng_state(gpu, x.device)
                return self.fn(x)
        if not torch.is_grad_enabled():  # the reversible forward pass (no graph): remember the generator's state
            self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if devices else None)
        return self.fn(x)


class MEFT(AdapterModule):
    Config = MEFTConfig
    wraps = ("module",)
    replaces_call = True
    identity_at_init = False  # y1 = lambda h + F(h): the coupling is not BERT's layer (see the module's text)

    def __init__(self, target: Target, config: MEFTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        encoder = target.module
        self.__dict__["encoder"] = encoder  # the base encoder, not registered: its tensors are the model's
        width = encoder.layer[0].attention.output.dense.out_features
        layers = range(len(encoder.layer))
        self.attn_adapters = nn.ModuleList(Adapter(width, config.bottleneck, config.dropout) for _ in layers)
        self.ffn_adapters = nn.ModuleList(Adapter(width, config.bottleneck, config.dropout) for _ in layers)
        self.lam, self.beta, self.reversible = config.lam, config.beta, config.reversible
        self.reversible_layers = len(encoder.layer) if config.reversible_layers is None else config.reversible_layers

    @classmethod
    def restructure(cls, config: MEFTConfig, model: nn.Module) -> None:
        if not bert_encoders(model):  # nothing changes: the check comes before the targets are selected
            raise ConfigError(
                f"meft rewrites the layers of an HF BERT-style encoder (encoder.layer[i] with attention.self, "
                f"attention.output, intermediate and output, no cross-attention) into reversible couplings, as the "
                f"official code does for BERT only; {type(model).__name__} has no such encoder. Use lora, or "
                "gradient checkpointing to save activation memory on this model."
            )

    def pairs(self, mask: Tensor | None) -> list[tuple[Half, Half]]:
        """(F, G) of each layer: the attention block with its series adapter, the feed-forward block with its
        parallel adapter (see the module's text)."""
        out = []
        for layer, ad_a, ad_f in zip(self.encoder.layer, self.attn_adapters, self.ffn_adapters, strict=True):

            def f(x: Tensor, layer: nn.Module = layer, ad: Adapter = ad_a) -> Tensor:
                context = layer.attention.self(x, attention_mask=mask)[0]
                block = layer.attention.output
                a = block.dropout(block.dense(context))
                return block.LayerNorm(x + a + ad(a))

            def g(x: Tensor, layer: nn.Module = layer, ad: Adapter = ad_f) -> Tensor:
                block = layer.output
                return block.LayerNorm(x + block.dropout(block.dense(layer.intermediate(x))) + ad(x))

            # the modules keep their own train/eval mode (the model's): a Half only groups them
            out.append((Half(f, [layer.attention, ad_a]), Half(g, [layer.intermediate, layer.output, ad_f])))
        return out

    def call(self, x: Tensor, attention_mask: Tensor | None = None, encoder_hidden_states: Any = None, *args: Any,
             **kwargs: Any) -> Any:  # fmt: skip
        if encoder_hidden_states is not None or kwargs.get("cache") is not None or kwargs.get("use_cache"):
            raise ConfigError(
                "meft runs its BERT encoder as an encoder: the model was called with encoder_hidden_states or a "
                "key/value cache (a decoder's call), which the reversible couplings do not take. Call the model "
                "without them, or use lora for a BERT used as a decoder."
            )
        pairs, lower = self.pairs(attention_mask), self.reversible_layers
        if self.reversible and torch.is_grad_enabled() and lower > 0:
            y1, y2 = reversible(x, x, pairs[:lower], self.lam, self.beta)
            y1, y2 = plain(y1, y2, pairs[lower:], self.lam, self.beta)
        else:
            y1, y2 = plain(x, x, pairs, self.lam, self.beta)
        outputs = require("transformers.modeling_outputs", "hf", "meft's BERT encoder")  # the model's own package
        return outputs.BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=(y1 + y2) / 2)


def bert_encoders(model: nn.Module) -> list[str]:
    """Paths of the BERT-style encoders in ``model`` (see :class:`MEFT`)."""
    found = []
    for path, module in walk(model):
        layers = getattr(module, "layer", None)
        if path.split(".")[-1] == "encoder" and isinstance(layers, nn.ModuleList) and len(layers):
            first = layers[0]
            parts = ("attention", "intermediate", "output")
            if all(hasattr(first, p) for p in parts) and not getattr(first, "add_cross_attention", False):
                if hasattr(first.attention, "self") and hasattr(first.attention, "output"):
                    found.append(path)
    return found
