"""SPT: sensitivity-aware visual parameter-efficient fine-tuning (He, Chen, Gao, Li, Dong and Zhuang,
"Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023, arXiv:2303.08566). Registry: ``spt_lora``,
``spt_adapter``.

Stage 1 (``prepare``, one pass over calibration batches): every candidate entry w gets the score
``s(w) = sum_b (dL_b/dw)^2`` (cross-entropy on the model's own head, model in train mode, at most 16 batches; the
official ``engine.get_sensitivity``). The global top-tau entries are selected; with n_W of them in matrix W,

    W structured  (LoRA ``y += B A x``, no alpha/r scaling; or Adapter)  if n_W >= P_struct(W) / alpha   (alpha = 10)
    W sparse      (``W_eff = W + delta`` on exactly those n_W entries)  otherwise, when n_W > 0
    vector v full (bias / norm weight trained whole)                     if n_v >= dim(v) / beta          (beta = 5)
    vector v sparse                                                      otherwise, when n_v > 0

P_struct is the structured module's own parameter count: LoRA ``r (d_in + d_out)`` (768x768: 12,288, threshold 1,228.8;
fc1/fc2: 30,720, threshold 3,072), Adapter ``2 r d_out + r + d_out``. tau is the one whose plan total (structured +
sparse entries + full vectors) is closest to ``param_budget`` (millions); the official code scans tau in 0.02M steps,
here a binary search over every tau (the total is non-decreasing in tau). Candidates are q, k, v (row slices of a
fused ``attn.qkv``, decided separately), attn.proj, fc1, fc2 weights, every Linear bias, and norm1/norm2/final-norm
weights and biases. Defaults (``configs/vtab_*_spt_*.sh``): r = 8, alpha = 10, beta = 5, 16 batches, dropout 0.1 on
the structured input (none for proj; one mask per input, so the q, k, v slices of a fused qkv share it, as the
official ``x_drop``), DropPath 0.1 on each structured output, budget 0.4M (the sweep is 0.2-1.0M).

ViT-B/16 count: the plan total, ``round(param_budget * 1e6)`` up to the step of the last tau, plus the head (76,900
for 100 classes). Measured on random-weight ViT-B/16 (one random calibration batch): spt_lora at 0.4M = 399,584 =
374,784 structured (14 LoRA matrices of 12,288 or 30,720) + 17,120 sparse entries + 7,680 full vectors (10 of 768);
the official cifar 0.4M plan also has 14 LoRA matrices (0.381M). spt_adapter at 1.0M: 995,621. ``spt_lora`` is
mergeable (sparse and vector deltas and LoRA are additive); ``spt_adapter`` is not. ``structured`` may name another
registry method wrapping Linear layers (``dora``): its AdapterModule is built per structured matrix with r (or dim) =
``r``, alpha = r, and the SPT dropout on its input.

The plan is saved as JSON (``plan_file``; reused when present); the scores are cached in a safetensors file
(``sensitivity_file``) that serves every budget. The config keeps (target, weight kind/count, bias kind/count), and
the sparse indices are persistent int64 buffers, so a saved adapter rebuilds without data.

Against the official code: (1) q/k/v are slices of the fused qkv rather than split Linears (same decisions); (2) the
cls token is not trained and its 768 is not added to the total (vpeft trains no base tensor in place); (3) sparse
entries in LayerNorm vectors are trained (the official ``replace_linear`` silently drops them while counting them in
the budget); (4) the sparse gradient comes from autograd of an index_add (an element-wise product), not the official K
x K diagonal; (5) tau is exact (closest total) rather than on a 0.02M grid; (6) spt_adapter plans use the adapter's
P_struct (the official supervised adapter config loads the LoRA plans). The SPT Adapter follows the official
``AttentionSPTSeq``/``MlpSPTSeq``: dropout on the adapted output y, nn.Linear init for W_down, zero W_up/b_up, GELU,
and a parallel adapter reading the input for attn.proj. Following the official configs, vectors and sparse deltas are
1-D and get no weight decay. An existing ``plan_file`` wins over ``param_budget``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core import (
    ROLES,
    AdapterModule,
    DropProbability,
    MethodConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Prepared,
    Rank,
    Target,
    fused_parts,
    name_matches,
    weight_gradients,
)
from ..errors import OptionError
from ..files import atomic_write
from ._blocks import dropout
from ._registry import METHODS

KINDS = ("none", "structured", "sparse", "full")
# target key, weight kind, weight count, bias kind, bias count
PlanEntry = tuple[str, Literal[KINDS], NonNegativeInt, Literal[KINDS], NonNegativeInt]


@dataclass
class SPTLoRAConfig(MethodConfig):
    targets: tuple[str, ...] = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "norm1", "norm2", "norm")
    param_budget: PositiveFloat = 0.4  # millions of trainable parameters (head excluded)
    structured: str = "lora"  # "lora", "adapter" (SPT's sequential adapter) or a registry method wrapping Linear
    r: Rank = 8  # LoRA rank / adapter bottleneck
    alpha: PositiveFloat = 10.0  # structured when n_W >= P_struct / alpha
    beta: PositiveFloat = 5.0  # vector fully tuned when n_v >= dim / beta
    dropout: DropProbability = 0.1  # on the structured module's input (not for attn.proj)
    drop_path: DropProbability = 0.1  # per-sample DropPath on the structured output
    calibration_batches: PositiveInt = 16
    score: Literal["grad2", "taylor"] = "grad2"  # grad2: sum_b g_b^2 (official); taylor: sum_b |g_b * w|
    plan_file: str | None = None
    sensitivity_file: str | None = None
    plan: tuple[PlanEntry, ...] = ()  # written by prepare()

    def check(self) -> None:
        name = "spt_adapter" if isinstance(self, SPTAdapterConfig) else "spt_lora"
        cls = structured_class(self.structured, name)
        if name == "spt_lora" and (cls is _SeqAdapter or not cls.mergeable):
            raise OptionError(
                f"spt_lora option structured must be mergeable ({self.structured!r} is not): use spt_adapter.",
                "structured",
            )


@dataclass
class SPTAdapterConfig(SPTLoRAConfig):
    structured: str = "adapter"


def structured_class(name: str, method: str = "spt") -> type:
    if name == "adapter":
        return _SeqAdapter
    cls = METHODS.get(name)
    if (
        cls is None
        or "linear" not in cls.wraps
        or cls.build_shared.__func__ is not AdapterModule.build_shared.__func__
        or cls.needs_calibration
    ):
        raise ValueError(
            f"{method} option structured must be 'adapter' or a registry method that wraps Linear layers without "
            f"shared tensors or calibration (lora, dora...), got {name!r}."
        )
    return cls


def _fields(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _is_attn_out(target: Target) -> bool:
    return any(name_matches(target.name, p) for p in ROLES["attn_out"])


class _SeqAdapter(nn.Module):
    """SPT's adapter: ``y + W_up gelu(W_down dropout(y) + b_d) + b_u``; on attn.proj it reads the input (parallel)."""

    def __init__(self, target: Target, r: int, dropout_p: float):
        super().__init__()
        self.parallel = _is_attn_out(target)
        self.down = nn.Linear(target.in_features if self.parallel else target.out_features, r)
        self.up = nn.Linear(r, target.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = dropout(0.0 if self.parallel else dropout_p)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.up(F.gelu(self.down(x if self.parallel else self.dropout(y))))


def input_dropout(target: Target, config: SPTLoRAConfig) -> float:
    """p of the dropout on a structured module's input: ``dropout``, none on attn.proj (official: raw proj input)."""
    return 0.0 if _is_attn_out(target) else config.dropout


def build_structured(target: Target, config: SPTLoRAConfig) -> nn.Module:
    """The structured module of one matrix; its input dropout is :class:`SPT`'s own (one mask per input)."""
    cls = structured_class(config.structured)
    if cls is _SeqAdapter:
        return _SeqAdapter(target, config.r, input_dropout(target, config))
    options = {"r": config.r, "dim": config.r, "alpha": float(config.r), "dropout": 0.0}
    fields = _fields(cls.Config)
    sub = cls.Config(**{k: v for k, v in options.items() if k in fields})
    if hasattr(sub, "check"):
        sub.check()
    return cls(target, sub, None)


# ---- stage 1: scores, allocation, plan -------------------------------------------------------------------------
def _candidates(target: Target) -> dict[str, tuple[str, slice | None]]:
    """``{candidate: (model parameter name, rows)}``; candidates are ``<target key>.weight`` / ``.bias``."""
    rows = fused_parts(target.module)[target.part] if target.part in ("q", "k", "v") else None
    return {
        f"{target.key}.{p}": (f"{target.name}.{p}", rows)
        for p in ("weight", "bias")
        if isinstance(getattr(target.module, p, None), Tensor)
    }


def sensitivity(model: nn.Module, params: dict[str, Tensor], batches: Any, limit: int, score: str) -> dict:
    """Sum over at most ``limit`` batches of g^2 (or |g w|) per parameter; the model is left as it was.

    The core's :func:`~vpeft.core.weight_gradients` folds each gradient into its score by a post-accumulate hook
    and frees it at once, so the gradients of all scored weights (ViT-B: 86M values) are never alive together. The
    model runs in train mode (official: drop path on, no augmentation). A weight the task's output never reaches (a
    detector skips the ViT's last norm) gets no gradient, scores 0 and is never chosen."""

    def fold(total: Tensor, g: Tensor, p: Tensor) -> None:
        total.add_(g.float().square() if score == "grad2" else (g * p).float().abs())

    scores, _ = weight_gradients(model, params, batches, limit, "spt", fold)
    return {n: s.cpu() for n, s in scores.items()}


class _Ranking:
    """Global top-tau over score tensors (ties go to earlier entries, in dict order)."""

    def __init__(self, scores: dict[str, Tensor]):
        self.scores = {n: s.flatten().float() for n, s in scores.items()}
        self.size = sum(s.numel() for s in self.scores.values())
        self.ascending = {n: s.sort().values for n, s in self.scores.items()}  # counts by binary search

    def kth_largest(self, k: int) -> Tensor:
        """The k-th largest score (1-based) without a global sort (ViT-B: 85M scores, whose sort with its int64
        indices took 1.4 GB): scores are >= 0, and non-negative float32 values order as their bit patterns do, so
        a bisection over patterns finds the largest value with at least k scores >= it, which is a score."""
        lo, hi = 0, 0x7F800000  # the patterns of +0.0 and +inf

        def value(bits: int) -> Tensor:
            return torch.tensor(bits, dtype=torch.int32).view(torch.float32)

        while lo < hi:
            mid = (lo + hi + 1) // 2
            at_least = sum(len(a) - int(torch.searchsorted(a, value(mid))) for a in self.ascending.values())
            lo, hi = (mid, hi) if at_least >= k else (lo, mid - 1)
        return value(lo)

    def counts(self, tau: int) -> dict[str, tuple[int, int, float]]:
        """``{name: (entries above the cut, tied entries taken, cut value)}`` for the top ``tau``."""
        if tau <= 0:
            return {n: (0, 0, math.inf) for n in self.scores}
        t = self.kth_largest(min(tau, self.size))
        ge = {n: len(a) - int(torch.searchsorted(a, t)) for n, a in self.ascending.items()}
        gt = {n: len(a) - int(torch.searchsorted(a, t, right=True)) for n, a in self.ascending.items()}
        left, out = min(tau, self.size) - sum(gt.values()), {}
        for n in self.scores:
            eq = min(left, ge[n] - gt[n])
            out[n], left = (gt[n], eq, float(t)), left - eq
        return out

    def indices(self, tau: int) -> dict[str, Tensor]:
        out = {}
        for n, (_, eq, t) in self.counts(tau).items():
            s = self.scores[n]
            idx = torch.cat([torch.nonzero(s > t).flatten(), torch.nonzero(s == t).flatten()[:eq]])
            out[n] = idx.sort().values
        return out


def decide(n: int, size: int, p_struct: int | None, alpha: float, beta: float) -> tuple[str, int]:
    """The SPT rule for one candidate with ``n`` selected entries: (kind, trainable count)."""
    if n == 0:
        return "none", 0
    if p_struct is None:  # vector
        return ("full", size) if n * beta >= size else ("sparse", n)
    return ("structured", p_struct) if n * alpha >= p_struct else ("sparse", n)


def allocate(
    scores: dict[str, Tensor], p_struct: dict[str, int | None], budget: int, alpha: float, beta: float
) -> tuple[int, dict[str, tuple[str, int]], dict[str, Tensor]]:
    """tau with the plan total closest to ``budget``, its decisions and its selected flat indices per candidate."""
    rank = _Ranking(scores)
    sizes = {n: s.numel() for n, s in rank.scores.items()}

    def total(tau: int) -> int:
        c = rank.counts(tau)
        return sum(decide(c[n][0] + c[n][1], sizes[n], p_struct[n], alpha, beta)[1] for n in sizes)

    lo, hi = 0, rank.size  # smallest tau with total >= budget (total is non-decreasing in tau)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if total(mid) < budget else (lo, mid)
    tau = lo if lo == 0 or abs(total(lo) - budget) < abs(total(lo - 1) - budget) else lo - 1
    idx = rank.indices(tau)
    return tau, {n: decide(idx[n].numel(), sizes[n], p_struct[n], alpha, beta) for n in sizes}, idx


def _load_plan(path: Path, config: SPTLoRAConfig, keys: list[str]) -> dict:
    plan = json.loads(path.read_text())
    if plan.get("format") != "vpeft.spt_plan" or plan["structured"] != config.structured or plan["r"] != config.r:
        raise ValueError(f"spt plan_file {path} was made for another setting (format, structured or r differ).")
    unknown = sorted(set(plan["decisions"]) - {f"{k}.{p}" for k in keys for p in ("weight", "bias")})
    if unknown:
        raise ValueError(f"spt plan_file {path} names candidates this model's targets lack, e.g. {unknown[:3]}.")
    return plan


def _make_plan(config: SPTLoRAConfig, model: nn.Module, targets: list[Target], calibration: Any) -> dict:
    cands = {c: v for t in targets for c, v in _candidates(t).items()}
    params = {pn: getattr(t.module, pn.rsplit(".", 1)[1]) for t in targets for pn, _ in _candidates(t).values()}
    cache = Path(config.sensitivity_file) if config.sensitivity_file else None
    if cache is not None and cache.is_file():
        scores = load_file(str(cache))
        missing = sorted(set(params) - set(scores))
        if missing:
            raise ValueError(f"spt sensitivity_file {cache} lacks scores for {missing[:3]} ...; delete it to redo.")
    else:
        scores = sensitivity(model, params, calibration, config.calibration_batches, config.score)
        if cache is not None:
            atomic_write(cache, lambda tmp: save_file(scores, tmp, metadata={"score": config.score}))
    by_key = {t.key: t for t in targets}
    table, p_struct = {}, {}
    with torch.random.fork_rng(devices=[]):  # counting structured modules must not move the RNG
        for c, (pn, rows) in cands.items():
            table[c] = scores[pn][rows] if rows is not None else scores[pn]
            t = by_key[c.rsplit(".", 1)[0]]
            matrix = c.endswith(".weight") and t.kind == "linear"
            p_struct[c] = sum(p.numel() for p in build_structured(t, config).parameters()) if matrix else None
    tau, decisions, idx = allocate(table, p_struct, round(config.param_budget * 1e6), config.alpha, config.beta)
    return {
        "format": "vpeft.spt_plan",
        "param_budget": config.param_budget,
        "structured": config.structured,
        "r": config.r,
        "alpha": config.alpha,
        "beta": config.beta,
        "score": config.score,
        "tau": tau,
        "total": sum(c for _, c in decisions.values()),
        "counts": {k: sum(c for kind, c in decisions.values() if kind == k) for k in KINDS[1:]},
        "decisions": {c: list(d) for c, d in decisions.items() if d[0] != "none"},
        "indices": {c: idx[c].tolist() for c, d in decisions.items() if d[0] == "sparse"},
    }


class SPT(AdapterModule):
    """One target's SPT tensors: a structured module or sparse delta on the weight, and a bias (or norm) delta."""

    Config = SPTLoRAConfig
    wraps = ("linear", "norm")
    mergeable = True
    needs_calibration = True
    no_weight_decay = ("weight_delta", "bias_delta")  # 1-D, as the official optimizer groups

    def __init__(self, target: Target, config: SPTLoRAConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        entry = {e[0]: e for e in config.plan}.get(target.key)
        if entry is None:
            raise ValueError(f"spt: target {target.key!r} has no plan entry; apply with calibration data.")
        indices = target.init or {}  # from prepare (fresh apply); a load copies the saved buffers instead
        self.kinds, self.in_features = {"weight": entry[1], "bias": entry[3]}, target.in_features
        self.structured = build_structured(target, config) if entry[1] == "structured" else None
        self.seq = isinstance(self.structured, _SeqAdapter)
        # what the structured module's option `dropout` did, drawn here so that the q, k, v slices share one mask
        takes = self.structured is not None and not self.seq and "dropout" in _fields(self.structured.Config)
        self.dropout = dropout(input_dropout(target, config) if takes else 0.0)
        self.drop_path = config.drop_path
        self.norm = (target.module.normalized_shape, target.module.eps) if target.kind == "norm" else None
        if self.norm is not None and not isinstance(target.module, nn.LayerNorm):
            raise ValueError(f"spt tunes LayerNorm vectors only; {target.key!r} is {type(target.module).__name__}.")
        self.sizes = {"weight": target.in_features * target.out_features, "bias": target.out_features}
        if self.norm is not None:
            self.sizes["weight"] = target.out_features
        for p, kind, count in (("weight", entry[1], entry[2]), ("bias", entry[3], entry[4])):
            if kind in ("sparse", "full"):
                setattr(self, f"{p}_delta", nn.Parameter(torch.zeros(count)))
            if kind == "sparse":
                idx = indices.get(p, torch.zeros(count, dtype=torch.long))
                self.register_buffer(f"{p}_index", torch.as_tensor(idx, dtype=torch.long).clone(), persistent=True)

    @classmethod
    def prepare(cls, config: SPTLoRAConfig, model: nn.Module, targets: list[Target], calibration: Any):
        if config.plan:
            raise ValueError("spt option plan is written by the method; reuse a plan with plan_file instead.")
        path = Path(config.plan_file) if config.plan_file else None
        if path is not None and path.is_file():
            plan = _load_plan(path, config, [t.key for t in targets])
        else:
            plan = _make_plan(config, model, targets, calibration)
            if path is not None:
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1) + "\n"))
        d = plan["decisions"]
        entries = []
        for t in targets:
            w, b = d.get(f"{t.key}.weight", ("none", 0)), d.get(f"{t.key}.bias", ("none", 0))
            if w[0] != "none" or b[0] != "none":
                entries.append((t.key, w[0], int(w[1]), b[0], int(b[1])))
        if not entries:
            raise ValueError(f"spt: param_budget={config.param_budget}M selects nothing; raise it.")
        decided = dataclasses.replace(config, targets=tuple(e[0] for e in entries), plan=tuple(entries))
        per_target: dict[str, dict[str, Tensor]] = {}  # target key -> {"weight"/"bias": its sparse indices}
        for candidate, idx in plan["indices"].items():
            key, tensor = candidate.rsplit(".", 1)
            per_target.setdefault(key, {})[tensor] = torch.tensor(idx)
        return Prepared(decided, per_target)

    def _dense(self, p: str) -> Tensor | None:
        kind = self.kinds[p]
        if kind == "full":
            return self.bias_delta if p == "bias" else self.weight_delta
        if kind != "sparse":
            return None
        values = getattr(self, f"{p}_delta")
        return values.new_zeros(self.sizes[p]).index_put((getattr(self, f"{p}_index"),), values)

    def _struct(self, x: Tensor, y: Tensor) -> Tensor:
        if not (self.training and self.drop_path > 0):
            return self.structured.adapt_output(x, y)
        delta = self.structured.adapt_output(x, y) - y
        keep = delta.new_empty((delta.shape[0],) + (1,) * (delta.ndim - 1)).bernoulli_(1 - self.drop_path)
        return y + delta * keep / (1 - self.drop_path)

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return self._adapt(x, y, self.dropout(x))

    @classmethod
    def adapt_slices(cls, x: Tensor, y: Tensor, parts: dict[str, AdapterModule], slices: dict[str, slice]) -> Tensor:
        """The slices of one fused projection with one dropout mask on x for all their structured modules, as the
        official ``AttentionSPTParallel`` feeds one ``x_drop`` to q, k and v (sparse deltas read x itself)."""
        drops = [m.dropout for m in parts.values() if isinstance(m.dropout, nn.Dropout)]
        dropped = drops[0](x) if drops else x
        chunks = list(y.split([s.stop - s.start for s in slices.values()], dim=-1))
        for i, part in enumerate(slices):
            if part in parts:
                chunks[i] = parts[part]._adapt(x, chunks[i], dropped)
        return torch.cat(chunks, dim=-1)

    def _adapt(self, x: Tensor, y: Tensor, dropped: Tensor) -> Tensor:
        """``y`` plus this target's tensors; ``dropped`` is x after the structured input dropout."""
        bias = self._dense("bias")
        if self.norm is not None:
            gamma = self._dense("weight")
            if gamma is not None:
                y = y + F.layer_norm(x, self.norm[0], None, None, self.norm[1]) * gamma
            return y + bias if bias is not None else y
        if self.kinds["weight"] == "sparse":
            idx = self.weight_index
            rows, cols = idx.div(self.in_features, rounding_mode="floor"), idx % self.in_features
            y = y.index_add(-1, rows, x[..., cols] * self.weight_delta)  # (..., K) summed into the selected rows
        if self.structured is not None and not self.seq:
            y = self._struct(dropped, y)
        y = y + bias if bias is not None else y
        return self._struct(x, y) if self.seq else y

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w, b = self._dense("weight"), self._dense("bias")
        weight = weight + w.view_as(weight).to(weight.dtype) if w is not None else weight
        if self.structured is not None:
            weight, bias = self.structured.merged(weight, bias)
        return weight, (bias + b.to(bias.dtype) if b is not None else bias)

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w, b = self._dense("weight"), self._dense("bias")
        bias = bias - b.to(bias.dtype) if b is not None else bias
        if self.structured is not None:
            weight, bias = self.structured.unmerged(weight, bias)
        return (weight - w.view_as(weight).to(weight.dtype) if w is not None else weight), bias


class SPTAdapter(SPT):
    Config = SPTAdapterConfig
    mergeable = False


def plan_total(config: SPTLoRAConfig) -> int:
    """Trainable parameters the config's plan asks for (the head excluded)."""
    return sum(e[2] + e[4] for e in config.plan)
