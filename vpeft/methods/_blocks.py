"""Pieces several method files share: activations, dropout, and residual-stream taps.

Dropout. On the CPU ``nn.Dropout`` draws its mask with ``bernoulli_`` into a float tensor and keeps that 4-byte
tensor for the backward pass; :class:`Dropout` draws it with ``torch.rand(...) >= p`` (the same distribution) and keeps
one byte per element, which is faster to draw and saves a quarter of the memory (timings and the saving over a LoRA
step: ``V-PEFT-Bench/perf/results/cpu.md``). On CUDA torch's fused kernel already keeps a 1-byte mask, so it is used
as is.

Residual taps. AdaptFormer and DVPT run parallel to a whole ``x + mlp(norm2(x))`` sub-block, so their adapter must
read ``x``, the input of ``norm2``, while it adds to the output of ``mlp``. A wrapper only sees its own module's input,
so such a method targets both ``mlp`` and ``norm2`` of a block: the (parameter-free) adapter on ``norm2`` puts its
input in a :class:`ResidualTaps` that the method's shared module holds, and the adapter on the ``mlp`` of the same
block takes it out. Without ``norm2`` targets the adapter reads the MLP input ``norm2(x)`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Target
from ..errors import ConfigError


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``, used by NOAH's adapter, Convpass and DVPT."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}  # tanh: LLM-Adapters


class Dropout(nn.Dropout):
    """``nn.Dropout`` (inverted: kept values scaled by ``1 / (1 - p)``) with a 1-byte mask on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= self.p  # P(keep) = 1 - p
        return torch.mul(x, keep).mul_(1.0 / (1.0 - self.p))  # autograd saves ``keep`` only (a scalar mul: none)


def dropout(p: float) -> nn.Module:
    """The dropout a method's option ``p`` asks for: :class:`Dropout`, or the identity when ``p`` is 0."""
    return Dropout(p) if p > 0 else nn.Identity()


def require_patch_grid(method: str, model: nn.Module, needs: str) -> None:
    """Refuse a method made for the patch tokens of a vision transformer, before it changes anything, on a model with
    no patch embedding (a language model): ``needs`` says what of the patch tokens the method relies on."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return
    raise ConfigError(
        f"{method} {needs}, which only a vision transformer has: {type(model).__name__} has no patch embedding (no "
        "Conv2d turns an image into a grid of tokens). For a language model use a method that adapts its projections "
        "or sub-blocks (lora, dora, adapter, ln_tune, bitfit)."
    )


def block_of(target: Target) -> str:
    """The logical path of the module that holds ``target`` (``blocks.3`` for ``blocks.3.mlp``)."""
    return target.name.rsplit(".", 1)[0] if "." in target.name else ""


class ResidualTaps:
    """Pairs each adapted MLP with the norm of its block, and carries the norm's input from one to the other.

    Not an ``nn.Module``: it holds no tensors to save, only the ones tapped in the current forward pass, keyed by
    block and device so that data-parallel replicas do not mix their inputs.
    """

    def __init__(self, method: str, targets: list[Target]):
        mlps = [block_of(t) for t in targets if t.kind != "norm"]
        norms = [block_of(t) for t in targets if t.kind == "norm"]
        unpaired = sorted(set(norms) ^ set(mlps) | {b for b in norms if norms.count(b) > 1}) if norms else []
        if unpaired:
            raise ConfigError(
                f"{method} pairs each MLP with one norm of the same block (its input is the residual stream the norm "
                f"reads); unpaired or ambiguous in {unpaired}. Target both (the default targets=('mlp', 'mlp_norm')) "
                "or only the MLPs (targets=('mlp',), which reads norm2(x))."
            )
        self.method = method
        self.active = bool(norms)
        self.stash: dict[tuple[str, torch.device], Tensor] = {}

    def put(self, block: str, x: Tensor) -> None:
        self.stash[(block, x.device)] = x  # (B, N, C)

    def take(self, block: str, x: Tensor) -> Tensor:
        """The residual stream of ``block`` tapped in this forward pass, or ``x`` when the method taps nothing."""
        if not self.active:
            return x
        tapped = self.stash.pop((block, x.device), None)
        if tapped is None:
            raise RuntimeError(f"{self.method}: the MLP of {block!r} ran without its norm first; it reads the residual "
                               "stream the norm sees (targets=('mlp',) reads the MLP input instead).")  # fmt: skip
        return tapped


class Taps(nn.Module):
    """The shared module of a method whose only shared state is its taps (it holds no tensors, so saves nothing)."""

    def __init__(self, method: str, targets: list[Target]):
        super().__init__()
        self.__dict__["taps"] = ResidualTaps(method, targets)
