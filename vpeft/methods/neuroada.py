"""NeuroAda: per-neuron bypass parameters on the strongest input connections (Zhang, Shen, Cao and Shutova,
"NeuroAda: Activating Each Neuron's Potential for Parameter-Efficient Fine-Tuning", EMNLP 2025, arXiv:2510.18940).

Every neuron (output row ``i`` of a target weight ``W0``, ``d_out x d_in``) gets trainable bypass parameters on its
``k`` input connections of largest magnitude, ``idx(i) = top-k_j |W0[i, j]|``, zero-initialised:

    W = W0 + scatter(theta),    y_i = (W0 x)_i + sum_{j < k} theta[i, j] x[idx(i, j)],    theta in R^{d_out x k}

so every neuron can adapt (a global top-k would leave most neurons untouched), the adapted model starts as the base,
and ``W0[i, idx(i, j)] += theta[i, j]`` merges exactly. Parameters: ``k * d_out`` per target. The index ``idx``
(``neuroada_index``, long, ``d_out x k``) is chosen once from the loaded base weights and saved with the adapter, so a
reloaded adapter addresses the same connections even if it were applied to other weights.

Memory. The official code computes ``F.linear(x, W0.flatten().scatter_add(idx, theta))``: a dense merged weight in
every forward and a dense ``d_out x d_in`` weight gradient in every backward, from which ``theta``'s gradient is
gathered. Here a custom autograd function never forms either: the forward adds ``theta[:, j] * x[..., idx[:, j]]``
over ``j`` (a ``tokens x d_out`` product at a time), and the backward computes ``dL/dtheta[:, j] = sum_tokens g *
x[..., idx[:, j]]`` and ``dL/dx`` by ``index_add`` of ``g * theta[:, j]`` into the columns ``idx[:, j]``, the same
``k`` passes. It keeps only the input ``x`` for the backward (as LoRA does), and the frozen ``W0`` gets no gradient.

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


class _Bypass(torch.autograd.Function):
    """``y[..., i] = sum_j theta[i, j] x[..., index[i, j]]`` without a dense ``out x in`` tensor either way."""

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, index: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_zeros(flat.shape[0], theta.shape[0])
        for j in range(theta.shape[1]):
            out.addcmul_(flat[:, index[:, j]], theta[:, j])
        ctx.save_for_backward(x, theta, index)
        return out.view(*x.shape[:-1], theta.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, theta, index = ctx.saved_tensors
        flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(flat)
            for j in range(theta.shape[1]):  # column index[i, j] of x fed neuron i through theta[i, j]
                grad_x.index_add_(1, index[:, j], g * theta[:, j])
            grad_x = grad_x.view_as(x)
        if ctx.needs_input_grad[1]:
            grad_theta = torch.stack([(g * flat[:, index[:, j]]).sum(0) for j in range(theta.shape[1])], dim=1)
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
        index, theta = self.neuroada_index, self.neuroada_delta
        return theta.new_zeros(theta.shape[0], self.d_in).scatter(1, index, theta)
