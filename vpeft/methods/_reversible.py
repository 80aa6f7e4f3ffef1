"""The reversible coupling MEFT builds on (Liao, Tan and Monz, "Make Pre-trained Model Reversible: From Parameter to
Memory Efficient Fine-Tuning", NeurIPS 2023, arXiv:2306.00477), as a building block; the registered method ``meft``
(vpeft/methods/meft.py) rewrites a BERT encoder's layers into it.

A stack of L couplings, each with two sub-layers F_i and G_i (in MEFT: a pre-trained attention or MLP block with an
adapter or LoRA inside):

    y1 = lambda x1 + F(x2),    y2 = beta x2 + G(y1)                      (forward, no graph kept)
    x2 = (y2 - G(y1)) / beta,  x1 = (y1 - F(x2)) / lambda                (backward: the inputs recomputed)

so the backward pass needs only the stack's final outputs: the activation memory does not grow with L (one layer's
recomputation graph at a time). :func:`reversible` runs the stack; the gradients equal those of the same computation
through autograd (tests/methods/test_reversible.py, float64). MEFT's defaults are lambda = beta = 0.1 with the
model's input duplicated, ``[x1, x2] = [h, h]``, and the output ``(x1 + x2) / 2``; the division by lambda and beta
amplifies the rounding of each recomputation (by 1 / lambda per layer), which is why the paper keeps the sub-layers
close to the pre-trained ones and why float32 training may need lambda, beta nearer 1.

Rewriting a model's blocks into this form is per architecture: ``meft`` does it for BERT-style encoders with the
paper's MEFT3 assignment (attention block F, feed-forward block G); MEFT1 and MEFT2 (a whole layer and an adapter as
F and G) and decoders are not done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, pairs, lam, beta, *params):  # noqa: ANN001 (autograd's signature)
        ctx.pairs, ctx.lam, ctx.beta, ctx.params = pairs, lam, beta, params
        with torch.no_grad():
            for f, g in pairs:
                x1 = lam * x1 + f(x2)
                x2 = beta * x2 + g(x1)
        ctx.save_for_backward(x1, x2)  # the outputs alone: every input is recomputed from them
        return x1.clone(), x2.clone()

    @staticmethod
    def backward(ctx, dy1, dy2):  # noqa: ANN001
        y1, y2 = ctx.saved_tensors
        lam, beta = ctx.lam, ctx.beta
        grads = {id(p): None for p in ctx.params}
        for f, g in reversed(ctx.pairs):
            trainable_g = [p for p in g.parameters() if p.requires_grad]
            trainable_f = [p for p in f.parameters() if p.requires_grad]
            with torch.enable_grad():
                z = y1.detach().requires_grad_()
                gz = g(z)
                dz, *dg = torch.autograd.grad(gz, [z, *trainable_g], dy2, allow_unused=True)
            x2 = (y2 - gz.detach()) / beta
            dz = dy1 + dz
            with torch.enable_grad():
                w = x2.detach().requires_grad_()
                fw = f(w)
                dw, *df = torch.autograd.grad(fw, [w, *trainable_f], dz, allow_unused=True)
            x1 = (y1 - fw.detach()) / lam
            for p, d in zip([*trainable_g, *trainable_f], [*dg, *df], strict=True):
                if d is not None:
                    grads[id(p)] = d if grads[id(p)] is None else grads[id(p)] + d
            dy1, dy2 = lam * dz, beta * dy2 + dw
            y1, y2 = x1, x2
        return (dy1, dy2, None, None, None, *(grads[id(p)] for p in ctx.params))


def reversible(
    x1: Tensor, x2: Tensor, pairs: Sequence[tuple[nn.Module, nn.Module]], lam: float = 0.1, beta: float = 0.1
) -> tuple[Tensor, Tensor]:
    """The outputs of the coupling stack ``pairs`` (one ``(F, G)`` per layer) on ``(x1, x2)``, with the memory-free
    backward pass described in the module's text. Gradients reach ``x1``, ``x2`` and the trainable tensors of every
    F and G (whose forward must be deterministic: the backward pass runs it again)."""
    if lam == 0 or beta == 0:
        raise ValueError("reversible: lambda and beta must be non-zero, or the inputs cannot be recomputed.")
    params = [p for f, g in pairs for m in (f, g) for p in m.parameters() if p.requires_grad]
    unique = list({id(p): p for p in params}.values())
    return _ReversibleStack.apply(x1, x2, tuple(pairs), lam, beta, *unique)


def plain(
    x1: Tensor, x2: Tensor, pairs: Sequence[tuple[nn.Module, nn.Module]], lam: float = 0.1, beta: float = 0.1
) -> tuple[Tensor, Tensor]:
    """The same computation through autograd (every activation kept): the reference :func:`reversible` equals."""
    for f, g in pairs:
        x1 = lam * x1 + f(x2)
        x2 = beta * x2 + g(x1)
    return x1, x2
