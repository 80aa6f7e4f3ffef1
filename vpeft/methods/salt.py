"""SALT: singular value adaptation with low-rank transformation (Elsayed, Hashmi, Elseiagy, Wang, Yaqub and
Almakky, "SALT: Singular Value Adaptation with Low-Rank Transformation", arXiv:2503.16055; BMVC 2025 per the
official README; code ``BioMedIA-MBZUAI/SALT``).

With the float32 SVD ``W = U S V^T`` of the loaded weight (taken when the adapter is built), the top r singular
values get a trainable scale a and shift beta, and the remaining k - r a low-rank update X Y inside their own
singular subspace:

    S' = [[diag(a * s_top + beta), 0], [0, diag(s_tail) + X Y]],    W' = U ReLU(S') V^T,    y = W' x + b

with ReLU element-wise on the whole k x k matrix (``relu="diag"`` clamps only its diagonal). Here W' is applied as
``W + delta W`` with ``delta W = U_top diag(ReLU(a s + beta) - s) V_top^T + U_tail (ReLU(diag(s_tail) + X Y) -
diag(s_tail)) V_tail^T``, which is exactly zero at init (a = 1, beta = 0, Y = 0) and keeps the SVD's rounding out
of the output. ``delta W`` is rebuilt in every training forward (O(d^3)); outside training, or without autograd,
it is cached and reused until a parameter or buffer changes (version counters) or the mode switches; merge folds
the same ``delta W`` into W. Optional regulariser (``loss``): ``reg_weight * sum ||diag(a s + beta) - diag(s)||_F +
||X Y||_F``, off by default as in the released ``SALT_config.yml`` (``reg_multiplier: 0``).

Defaults, the paper's SAM ViT-B setting: every block's fused qkv (one SVD of the 3d x d matrix, as the official),
proj, fc1 and fc2 (roles ``qkv``, ``attn_out``, ``mlp_in``, ``mlp_out``: timm names and segment_anything's
``mlp.lin1``/``lin2``), r_lora = 256, and r = floor(ratio k) with ``ratio = {qkv: 0.99, attn_out: 0.99, mlp_in:
0.066, mlp_out: 0.066}``: at k = 768 that is r = 760 on qkv and proj and r = 50 on the MLP, the ranks of the official
SAM1 encoder (``SALTLinear(..., rank=760, r_lora=256)`` in ``image_encoder.py``, ``rank=50`` in ``common.py``; the
lines are commented out in the released code, which runs its S-SAM baseline there). A ratio is per target: a float
for all, or a mapping from roles or module names to floats (the first key that matches a target is its ratio).
X is Kaiming-uniform (a = sqrt(20), fan_in, relu gain) and Y = 0, so W' = W at init; ``init="sam1"`` is the SAM1
file's X, Y ~ N(0, 0.01^2) (not the base model at init). ``rank`` sets r absolutely (overrides ratio).

Count per layer ``2 r + 2 (k - r) r_lora``. SAM ViT-B (``sam:vit_b``) and ViT-B/16 (k = 768 on all four):
qkv and proj 2 * 760 + 2 * 8 * 256 = 5,616, fc1 and fc2 2 * 50 + 2 * 718 * 256 = 367,716, so 12 * (2 * 5,616 + 2 *
367,716) = 8,959,968 (10.0% of SAM ViT-B's 89,670,912-parameter encoder). The paper's 3.9% is this count in the
official accounting (``main.py``'s ``salt`` strategy at 512 x 512 input): trainable are the SALT tensors plus
7,144 on the two neck convs (``SALTConv2d``, rank 250; vpeft wraps no conv), ``pos_embed`` (32 x 32 x 768 =
786,432), every parameter named ``norm`` (36,864 encoder, 4,608 decoder) and the text affine (131,840): 9,926,856;
the total also holds the frozen CLIP ViT-B/32 (151,277,313) beside SAM at 512 (91,343,408) and the added SALT
tensors: 9,926,856 / 251,719,673 = 3.94%. The same accounting gives the README's LoRA (rank 256) row exactly (LoRA
on the same four layers and the two neck convs, 38,666,240): 39,625,984 / 281,418,801 = 14.08%.

The released configuration (``SALT_config.yml``, the SAM2 Hiera path, ``global_adapter="salt"``): ``ratio=0.1,
r_lora=256`` on the same four layers, r = max(1, floor(0.1 k)) = 76 at k = 768: 48 * (152 + 2 * 692 * 256) =
17,013,888 on ViT-B/16 (19.8%). U, S, V are persistent buffers (an SVD on another device may return other signs,
which change X Y's meaning), so the adapter file holds about one copy of the targeted weights. Mergeable. Not done:
the official per-layer ``torch.manual_seed(42)`` and the (reg) tuple returned by every rewritten block; trained norms
and ``pos_embed`` (the official ``salt`` strategy) are other methods' job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import (
    ROLES,
    AdapterModule,
    LenientRank,
    MethodConfig,
    NonNegativeFloat,
    ProperFraction,
    Rank,
    Target,
    name_matches,
)
from ..errors import ConfigError, OptionError
from . import _svd

# the paper's ranks on SAM ViT-B (k = 768) as fractions of k: floor(0.99 * 768) = 760, floor(0.066 * 768) = 50
PAPER_RATIOS = {"qkv": 0.99, "attn_out": 0.99, "mlp_in": 0.066, "mlp_out": 0.066}


@dataclass
class SALTConfig(MethodConfig):
    targets: tuple[str, ...] = ("qkv", "attn_out", "mlp_in", "mlp_out")
    # r = max(1, floor(ratio * k)) top singular values get scale and shift; one float, or per role / module name
    ratio: ProperFraction | dict[str, ProperFraction] = field(default_factory=lambda: dict(PAPER_RATIOS))
    rank: Rank | None = None  # r as an absolute count (overrides ratio)
    r_lora: LenientRank = 256  # rank of X Y in the tail; the released SAM2 file uses 256 on every layer
    relu: Literal["elementwise", "diag"] = "elementwise"
    init: Literal["identity", "sam1"] = "identity"  # identity (SAM2 file) | sam1
    reg_weight: NonNegativeFloat = 0.0

    def check(self) -> None:
        if isinstance(self.ratio, dict) and not self.ratio:
            raise OptionError("salt option ratio must be one value in (0, 1) or a non-empty map of them, got {}.",
                              "ratio")  # fmt: skip


def ratio_for(target: Target, ratio: float | dict[str, float]) -> float:
    """The target's ratio: the float itself, or the value of the first key (a role or a module name) it matches."""
    if not isinstance(ratio, dict):
        return ratio
    for key, value in ratio.items():
        if any(name_matches(target.key, pattern) for pattern in ROLES.get(key, (key,))):
            return value
    raise ConfigError(
        f"salt option ratio has no entry for target {target.key!r} (keys {list(ratio)}): add its role or module "
        "name, or give one ratio for every target (ratio=0.1)."
    )


class SALT(AdapterModule):
    Config = SALTConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: SALTConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        weight, _ = target.weight_and_bias()  # (out, in)
        k = min(weight.shape)
        r = config.rank if config.rank is not None else max(1, math.floor(ratio_for(target, config.ratio) * k))
        if r >= k:
            raise ValueError(f"salt: r={r} top singular values leave no tail in {target.key!r} (k = {k}).")
        self.r, self.elementwise = r, config.relu == "elementwise"
        U, S, V = _svd.svd(weight)
        self.register_buffer("U", U, persistent=True)  # (out, k)
        self.register_buffer("S", S, persistent=True)  # (k,)
        self.register_buffer("V", V, persistent=True)  # (in, k)
        self.trainable_scale = nn.Parameter(torch.ones(r))  # a
        self.trainable_shift = nn.Parameter(torch.zeros(r))  # beta
        self.lora_X = nn.Parameter(torch.empty(k - r, config.r_lora))  # ((k - r), r_lora)
        self.lora_Y = nn.Parameter(torch.zeros(config.r_lora, k - r))  # (r_lora, (k - r))
        if config.init == "identity":
            nn.init.kaiming_uniform_(self.lora_X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
        else:
            nn.init.normal_(self.lora_X, std=0.01)
            nn.init.normal_(self.lora_Y, std=0.01)
        self._cache: tuple[tuple, Tensor] | None = None

    def build_delta(self) -> Tensor:
        """``W' - W`` (out x in), rebuilt from the parameters."""
        r, S = self.r, self.S
        top = torch.relu(self.trainable_scale * S[:r] + self.trainable_shift) - S[:r]  # (r,)
        tail = torch.diag(S[r:]) + self.lora_X @ self.lora_Y  # (k - r, k - r)
        if self.elementwise:
            tail = torch.relu(tail)
        else:
            d = tail.diagonal()
            tail = tail + torch.diag(torch.relu(d) - d)
        tail = tail - torch.diag(S[r:])
        U, V = self.U, self.V
        # multi_dot picks the cheaper order: U (tail V^T) when out > in (qkv, fc1), (U tail) V^T otherwise
        return (U[:, :r] * top) @ V[:, :r].T + torch.linalg.multi_dot([U[:, r:], tail, V[:, r:].T])

    def delta(self) -> Tensor:
        """The cached ``W' - W`` outside training when no gradient is wanted, else a fresh rebuild."""
        tensors = [*self.parameters(), *self.buffers()]
        if self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            self._cache = None
            return self.build_delta()
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.build_delta())
        return self._cache[1]

    def train(self, mode: bool = True) -> SALT:
        self._cache = None
        return super().train(mode)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + x @ self.delta().to(x.dtype).T

    def delta_weight(self) -> Tensor:
        return self.delta()

    @classmethod
    def loss(cls, config: SALTConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        if config.reg_weight == 0 or not layers:
            return None
        total = 0.0
        for layer in layers:
            s = layer.S[: layer.r]
            total = total + torch.linalg.vector_norm(layer.trainable_scale * s + layer.trainable_shift - s)
            total = total + torch.linalg.matrix_norm(layer.lora_X @ layer.lora_Y)
        return config.reg_weight * total
