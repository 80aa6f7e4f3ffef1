"""What the core reads of a model's modules, before any adapter is involved: a module's kind, its weight in
``(out, in, ...)`` layout, the q/k/v slices of a fused projection, and :class:`Target`, one place an adapter attaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

WHOLE = "all"  # part name of an adapter that covers a whole module rather than one slice
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


@dataclass
class Target:
    """One place an adapter attaches: a module, or one slice of a fused projection."""

    name: str  # logical module path
    module: nn.Module  # the base module (never a wrapper)
    part: str  # WHOLE, or q / k / v / out_proj
    kind: str  # linear | conv2d | norm | mha | module
    index: int | None  # block index (first integer in the path)
    position: int = 0  # order among this adapter's targets
    count: int = 1  # number of targets of this adapter
    # What the method's ``prepare`` computed for this target (``Prepared.per_target[key]``: factors, indices, a
    # gradient); None when the adapter is rebuilt from a saved config, whose tensors then come from the file.
    init: Any = None

    @property
    def key(self) -> str:
        return self.name if self.part == WHOLE else f"{self.name}[{self.part}]"

    def weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """Views of the base weight in ``(out, in, ...)`` layout (HF Conv1D transposed) and bias, sliced to the part."""
        if self.kind == "mha" and self.part == "out_proj":
            return weight_and_bias(self.module.out_proj)
        return weight_and_bias(self.module, fused_parts(self.module)[self.part] if self.part != WHOLE else None)

    @property
    def in_features(self) -> int:
        """Input width; for a sub-block (timm ``Mlp``, ``Attention``, ``Block``) the input of its first Linear."""
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            return m.embed_dim
        if is_conv1d(m):
            return m.weight.shape[0]
        return getattr(m, "in_features", None) or getattr(m, "in_channels", None) or _width(m, first=True)

    @property
    def out_features(self) -> int:
        """Output width (of the slice, for a fused projection); for a sub-block the output of its last Linear."""
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            return m.embed_dim
        full = m.nf if is_conv1d(m) else getattr(m, "out_features", None) or getattr(m, "out_channels", None)
        full = full or _width(m, first=False)
        return full if self.part == WHOLE else full // 3


def _width(module: nn.Module, first: bool) -> int:
    shape = getattr(module, "normalized_shape", None) or getattr(module, "num_features", None)
    if shape is None and is_rms_norm(module):
        shape = module.weight.shape
    if shape is not None:
        return int(shape[-1]) if isinstance(shape, (tuple, list)) else int(shape)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if not linears:
        raise ValueError(
            f"cannot tell the width of {type(module).__name__}: it is no Linear, norm or conv and holds no Linear."
        )
    layer = linears[0] if first else linears[-1]
    if is_conv1d(layer):
        return layer.weight.shape[0] if first else layer.nf
    return layer.in_features if first else layer.out_features


def kind_of(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, _NORMS) or is_rms_norm(module):
        return "norm"
    return "module"


def fused_parts(module: nn.Module) -> dict[str, slice]:
    """Output columns of q, k and v for a fused projection; empty when the module is not one."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return {}
        d = module.embed_dim
        return {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d), "out_proj": slice(0, d)}
    out = module.nf if is_conv1d(module) else getattr(module, "out_features", 0) if isinstance(module, nn.Linear) else 0
    if out == 0 or out % 3:
        return {}
    d = out // 3
    return {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}


def weight_and_bias(module: nn.Module, rows: slice | None = None) -> tuple[Tensor, Tensor | None]:
    """Views of ``module``'s weight in ``(out, in, ...)`` layout and its bias, limited to output ``rows`` if given;
    for ``nn.MultiheadAttention`` its fused q/k/v in-projection."""
    if isinstance(module, nn.MultiheadAttention):
        weight, bias = module.in_proj_weight, module.in_proj_bias
    else:
        weight = module.weight.T if is_conv1d(module) else module.weight  # HF Conv1D stores (in, out)
        bias = getattr(module, "bias", None)  # RMS norms have none
    if rows is not None:
        weight, bias = weight[rows], (bias[rows] if bias is not None else None)
    return weight, bias


def is_rms_norm(module: nn.Module) -> bool:
    """An RMS norm as model libraries write their own (``LlamaRMSNorm``, timm's ``RmsNorm``): ``weight * x / rms(x)``
    over the last dimension, matched by duck type (the class name and a 1-D weight), as ``nn.RMSNorm`` is by type."""
    weight = getattr(module, "weight", None)
    return type(module).__name__.lower().endswith("rmsnorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): a Linear with its weight stored transposed; matched by duck type."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")
