"""DynMoLE: a mixture of LoRA experts with hybrid routing by the Tsallis entropy of the router (Li et al.,
"DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism", arXiv:2504.00661).

Every adapted Linear holds E LoRA experts ``(A_i, B_i)`` and a router ``W_g in R^{E x d_in}`` on its input. Per token,
with ``p = softmax(W_g x)`` and its normalised Tsallis entropy of index q,

    S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1),    S~_q(p) = S_q(p) / S_q(uniform) = S_q(p) (q - 1) / (1 - E^{1-q})

(Shannon's entropy over log E at q = 1), the token is routed

* to every expert, when ``S~_q(p) > entropy_threshold`` (an uncertain router: soft routing, all experts);
* else to its top-p experts: the most probable ones whose cumulative probability stays within ``top_p``, and at least
  ``keep_top_k`` of them;

and each routed expert is weighted by its router probability as it is (not renormalised over the routed ones):

    h = W0 x + sum_i m_i p_i (alpha / r) B_i A_i dropout(x),    m_i in {0, 1} the routing above

``A_i`` is Kaiming-uniform, ``B_i`` zeros (the adapted model equals the base model at initialisation), and the router
Kaiming-uniform with ``a = sqrt(5)`` (the official ``router_init_range`` 5.0: nn.Linear's init).

Auxiliary loss (:meth:`DynMoLE.loss`), over the tokens of all adapted layers together (the official code concatenates
every layer's router outputs before it):

    L_aux = entropy_weight * mean_tokens S~_q(p) + balance * E sum_i f_i P_i,
    f_i = mean_tokens m_i p_i  (the routed weight of expert i),    P_i = mean_tokens p_i

the entropy term pushes routers towards confident choices, the Switch-style term spreads the load. Defaults: the
official weights 0.01 (entropy) and 0.001 (balance). How the routing statistics reach the loss, with gradient
accumulation and in evaluation, is MoLA's (:mod:`vpeft.methods.mola`): each layer keeps its latest training forward
pass's router outputs, ``vpeft.method_loss`` takes them after each micro-batch (the training loop averages over the
step's micro-batches), and in evaluation nothing is kept and the loss is None.

Defaults are the official code's DynMoLE template (``mikecovlee/DynMoLE``, a snapshot of TUDB-Labs' MoE-PEFT:
``templates/dynmole.json``, ``moe_peft/adapters/dynmole``): E = 6 experts of rank 24, alpha 48, dropout 0.05 on the
MLP's projections (``mlp_in``, ``mlp_out``; the official also adapts Llama's ``gate_proj``: add ``"mlp.gate_proj"`` to
``targets``), ``top_p`` 0.75, ``keep_top_k`` 2, q = 1.1, threshold 0.9, eps 1e-5. Parameters per target:
``E (r (d_in + d_out) + d_in)``.

Departures from the official code: padding tokens count in the loss (the official masks them with the attention
mask, which an adapted layer does not see); the experts are computed densely with one dropout mask (as in MoLA here;
the official also runs every expert on every token, each with its own dropout mask); the router runs in the model's
dtype (float32 for half-precision models; the official: always float32); its Rényi-entropy variant is not offered.
Wraps Linear (and HF Conv1D) and fused-projection slices. Not mergeable: the mixture weights depend on the token.

Cost: a training step takes 1.33x LoRA's (r = 24 on the same two roles) at the defaults, with 1,110,144 parameters
against 181,248 (``python V-PEFT-Bench/perf/experts_speed.py``: a random Llama 256 wide with 4 blocks, batch 4 x 128,
one thread, process CPU time, medians of 5 rounds, this project's loaded 2-core CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import (
    AdapterModule,
    DropProbability,
    FiniteFloat,
    MethodConfig,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ProperFraction,
    Rank,
    Target,
)
from ..errors import OptionError
from .mola import LoRAExperts


@dataclass
class DynMoLEConfig(MethodConfig):
    targets: tuple[str, ...] = ("mlp_in", "mlp_out")
    r: Rank = 24  # rank of every expert
    alpha: FiniteFloat = 48.0  # every expert's update is scaled by alpha / r
    dropout: DropProbability = 0.05  # on the experts' input
    experts: PositiveInt = 6  # E, at least 2
    top_p: ProperFraction = 0.75  # route to the most probable experts within this cumulative probability...
    keep_top_k: PositiveInt = 2  # ...and to at least this many
    entropy_index: PositiveFloat = 1.1  # q of the Tsallis entropy, in (0, 2]; 1 is Shannon's
    entropy_threshold: PositiveFloat = 0.9  # above this normalised entropy a token goes to every expert (>= 1: never)
    entropy_eps: PositiveFloat = 1e-5  # added to the probabilities inside the entropy
    entropy_weight: NonNegativeFloat = 0.01  # of the mean normalised entropy in the auxiliary loss
    balance: NonNegativeFloat = 0.001  # of the load-balancing term in the auxiliary loss

    def check(self) -> None:
        if self.experts < 2:
            raise OptionError(
                f"dynmole option experts={self.experts}: a mixture needs at least 2 experts (the entropy of one "
                "expert's router is always 0), e.g. experts=6.",
                "experts",
            )
        if self.keep_top_k > self.experts:
            raise OptionError(
                f"dynmole option keep_top_k={self.keep_top_k} exceeds experts={self.experts}: a token cannot be "
                f"routed to more experts than there are; use keep_top_k <= {self.experts}.",
                "keep_top_k",
            )
        if self.entropy_index > 2:
            raise OptionError(
                f"dynmole option entropy_index={self.entropy_index} is above 2; the Tsallis index q must be in "
                "(0, 2] (the paper's and the official default is 1.1).",
                "entropy_index",
            )


def tsallis_entropy(probs: Tensor, q: float, eps: float = 1e-5) -> Tensor:
    """The Tsallis entropy of index ``q`` of each distribution over the last dimension, divided by its largest value
    (the uniform distribution's), with ``eps`` added to every probability as in the official code: in [0, ~1]."""
    e = probs.shape[-1]
    p = probs + eps
    if q == 1.0:  # the limit q -> 1 is Shannon's entropy
        return -(p * p.log()).sum(-1) / math.log(e)
    return (1 - p.pow(q).sum(-1)) / (1 - e ** (1 - q))  # S_q / S_q(uniform): the (q - 1) factors cancel


def hybrid_routing(probs: Tensor, top_p: float, keep_top_k: int, q: float, threshold: float, eps: float) -> Tensor:
    """The 0/1 routing mask ``(..., E)``: top-p experts (at least ``keep_top_k``), or all of them where the normalised
    Tsallis entropy of ``probs`` exceeds ``threshold``."""
    ordered, order = probs.sort(dim=-1, descending=True)
    keep = ordered.cumsum(-1) <= top_p
    keep[..., :keep_top_k] = True
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    if threshold < 1.0:  # the official code broadcasts only below 1 (the normalised entropy is at most ~1)
        mask |= (tsallis_entropy(probs, q, eps) > threshold).unsqueeze(-1)
    return mask


class DynMoLE(LoRAExperts):
    Config = DynMoLEConfig

    def __init__(self, target: Target, config: DynMoLEConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared, config.experts)
        self.routing = (config.top_p, config.keep_top_k, config.entropy_index, config.entropy_threshold)
        self.q, self.eps = config.entropy_index, config.entropy_eps
        self.collect = config.entropy_weight > 0 or config.balance > 0

    def gates(self, probs: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        top_p, keep, q, threshold = self.routing
        gates = probs * hybrid_routing(probs.detach(), top_p, keep, q, threshold, self.eps)
        return gates, (probs, gates)

    @classmethod
    def loss(cls, config: DynMoLEConfig, layers: list[AdapterModule], shared: nn.Module | None) -> Tensor | None:
        kept = [k for layer in layers if (k := layer.stash.take()) is not None]
        if not kept or (config.entropy_weight == 0 and config.balance == 0):
            return None
        e = config.experts
        probs = torch.cat([p.reshape(-1, e) for p, _ in kept])  # (N, E): all tokens of all layers
        gates = torch.cat([g.reshape(-1, e) for _, g in kept])
        return auxiliary_loss(probs, gates, config)


def auxiliary_loss(probs: Tensor, gates: Tensor, config: DynMoLEConfig) -> Tensor:
    """``entropy_weight * mean S~_q(p) + balance * E sum_i f_i P_i`` over tokens ``probs`` (N, E), the router's
    distributions, routed to weights ``gates`` (N, E): ``f_i = mean gates_i``, ``P_i = mean probs_i``."""
    entropy = tsallis_entropy(probs, config.entropy_index, config.entropy_eps).mean()
    balance = probs.shape[-1] * (gates.mean(0) * probs.mean(0)).sum()
    return config.entropy_weight * entropy + config.balance * balance
