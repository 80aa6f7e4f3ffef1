"""NeuroAda: per-neuron bypass parameters on the strongest input connections (Zhang, Shen, Cao and Shutova,
"NeuroAda: Activating Each Neuron's Potential for Parameter-Efficient Fine-Tuning", EMNLP 2025, arXiv:2510.18940).

Every neuron (output row ``i`` of a target weight ``W0``, ``d_out x d_in``) gets trainable bypass parameters on its
``k`` input connections of largest magnitude, ``idx(i) = top-k_j |W0[i, j]|``, zero-initialised:

    W = W0 + scatter(theta),    y_i = (W0 x)_i + sum_{j < k} theta[i, j] x[idx(i, j)],    theta in R^{d_out x k}

so every neuron can adapt (a global top-k would leave most neurons untouched), the adapted model starts as the base,
and ``W0[i, idx(i, j)] += theta[i, j]`` merges exactly. Parameters: ``k * d_out`` per target. The index ``idx``
(``neuroada_index``, long, ``d_out x k``) is chosen once from the loaded base weights and saved with the adapter, so a
reloaded adapter addresses the same connections even if it were applied to other weights.

Memory and speed. The official code computes ``F.linear(x, W0.flatten().scatter_add(idx, theta))`` and lets
autograd keep the dense merged weight for the backward and form a dense ``d_out x d_in`` weight gradient. Here a
custom autograd function keeps only the input ``x`` (as LoRA does) and builds the dense ``D = scatter(theta)`` when it
needs it: the forward adds ``x D^T``, the backward computes ``dL/dx = g D`` and ``dL/dtheta = (g^T x)`` gathered at
``idx``. ``D`` and ``g^T x`` live only inside one layer's forward or backward (at most ``d_out x d_in``, 3.5 MB for
SmolLM2's largest matrix), so nothing dense per target outlives its call, and the frozen ``W0`` gets no gradient. The
cost is three matmuls of the base layer's size per target (the delta's forward and input gradient, and ``g^T x``),
where full fine-tuning adds one to the frozen layer's two: a ViT-B/16 step with NeuroAda on all six roles takes 1.9x
LoRA's (``V-PEFT-Bench/perf/profile_step.py``: the added time is ``aten::mm``). A gather per selected column (``k``
strided gathers of ``tokens x d_out``) does fewer multiplications but ran 5-25x slower on one CPU core at ``k = 20``
(forward and backward of 1,024 tokens: 576 -> 576, 155 vs 14 ms; 576 -> 1536, 500 vs 37 ms; ViT-Tiny's 192 -> 192 on
6,304 tokens, 314 vs 12 ms).

Defaults, from the official repository (``FightingFighting/NeuroAda``, ``train_our.py`` with ``--peft_type
perCell_mag_add``, selection in ``utils/select_para.py::select_perCell``): ``k = 20`` (the README's command and the
``top20`` scripts; ``top1``, the abstract's "as little as 0.02%" of LLaMA-7B, is the other released setting) on every
linear layer of a block: q, k, v, the output projection, up (and gate) and down. vpeft's roles name all but Llama's
``gate_proj``; add it with ``targets=(..., "gate_proj")`` on gated FFNs. SmolLM2-135M at the defaults (without
gate): 30 * 20 * (576 + 192 + 192 + 576 + 1536 + 576) = 2,188,800 parameters.

Departures: the magnitude selection only (``perCell_mag``); the gradient-magnitude variant (``perCell_gra``), which
needs a calibration pass, and the ablations (random cells, reversed order) are not offered. ``k`` above a target's
input width is refused (the official code clamps it to the width). The official runs also train the task head fully,
which is vpeft's head option.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import AdapterModule, MethodConfig, PositiveInt, Target
from ..errors import OptionError


@dataclass
class NeuroAdaConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    k: PositiveInt = 20  # input connections per neuron that get a bypass parameter (top-k by |W0|)


def top_k_inputs(weight: Tensor, k: int) -> Tensor:
    """``(out, k)``: per row of ``weight`` (``out x in``), the columns of its ``k`` largest magnitudes, ascending."""
    return weight.detach().float().abs().topk(k, dim=1).indices.sort(dim=1).values


def _scattered(theta: Tensor, index: Tensor, d_in: int) -> Tensor:
    """The dense ``d_out x d_in`` delta: ``theta[i, j]`` at column ``index[i, j]`` of row ``i``, zeros elsewhere."""
    return theta.new_zeros(theta.shape[0], d_in).scatter_(1, index, theta)


class _Bypass(torch.autograd.Function):
    """``y[..., i] = sum_j theta[i, j] x[..., index[i, j]]``, keeping only ``x`` (and ``theta``) for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(x, theta, index)
        return x @ _scattered(theta, index, x.shape[-1]).t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, theta, index = ctx.saved_tensors
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _scattered(theta, index, x.shape[-1])
        if ctx.needs_input_grad[1]:  # the full weight gradient g^T x, read at the selected connections only
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            grad_theta = grad_weight.gather(1, index)
        return grad_x, grad_theta, None


class NeuroAda(AdapterModule):
    Config = NeuroAdaConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: NeuroAdaConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in), HF Conv1D transposed, a fused projection's slice
        if config.k > weight.shape[1]:
            raise OptionError(
                f"neuroada option k={config.k} exceeds the {weight.shape[1]} inputs of target {target.key!r}: each "
                f"neuron has only that many connections to choose from. Use k <= {weight.shape[1]}.",
                "k",
            )
        self.register_buffer("neuroada_index", top_k_inputs(weight, config.k), persistent=True)
        self.neuroada_delta = nn.Parameter(torch.zeros(weight.shape[0], config.k))  # theta: zeros, the base at init
        self.d_in = weight.shape[1]

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + _Bypass.apply(x, self.neuroada_delta.to(x.dtype), self.neuroada_index)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight.scatter_add(1, self.neuroada_index, self.neuroada_delta.to(weight.dtype)), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight.scatter_add(1, self.neuroada_index, -self.neuroada_delta.to(weight.dtype)), bias

    def delta_weight(self) -> Tensor:
        return _scattered(self.neuroada_delta, self.neuroada_index, self.d_in)
