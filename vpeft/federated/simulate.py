"""A federated fine-tuning simulation in one process: K clients hold non-IID shares of a run's training split
(:func:`~vpeft.federated.split.dirichlet_split`), and each round every sampled client starts from the server's
adapter, trains ``local_steps`` AdamW steps on its share (a fresh optimiser each round, as in FedAvg), and sends its
adapter tensors back; the server aggregates them (:mod:`~vpeft.federated.aggregation`: FedAvg, FFA-LoRA, LoRA-FAIR;
or DP-FedAvg with clipping, noise and the accountant of :mod:`~vpeft.federated.privacy`) and the result is evaluated.

Clients start each round from the served adapter: for LoRA-FAIR that is its "Avg-Initial" rule, for FedAvg and
FFA-LoRA the usual broadcast. With ``dp_clip`` set the aggregation is DP-FedAvg on every trainable tensor, and a
``dylora`` adapter trains at one rank per round drawn by the server (DP-DyLoRA, arXiv:2405.06368: one rank for all
clients keeps the clipped updates' sensitivity at C); epsilon at ``delta`` is recorded every round.

The run directory holds ``config.yaml`` and ``classes.json`` (so ``tools/test.py`` evaluates the federated adapter
like any run), ``adapter/`` (the server's final adapter), ``metrics.jsonl`` (one record per round: the evaluation
metrics, the aggregation residual ``||sum p_k B_k A_k - B' A'||`` and FedAvg's for comparison, epsilon) and
``summary.json``. The loss is the task's alone (no method regulariser); no learning-rate schedule.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

import vpeft

from ..core import active_adapter, adapter_record, adapter_tensors, layers_of, load_adapter_tensors
from ..data import build_loader
from ..engine.config import RunConfig, dump_config
from ..engine.train import build_run
from ..errors import ConfigError, ExistingPathError
from ..files import atomic_write
from ..methods.dylora import DyLoRA, draw_rank
from ..methods.ffa_lora import FFALoRA
from . import aggregation as agg
from .privacy import Accountant, check_dp, dp_fedavg
from .split import dirichlet_split


@dataclass
class FedConfig:
    """The federated options (the run config gives the task, model, method, lr and batch size)."""

    rule: str = "fedavg"  # fedavg, ffa_lora, lora_fair (ignored under DP: DP-FedAvg)
    clients: int = 4
    beta: float = 0.5  # Dirichlet concentration of the label split
    rounds: int = 5
    local_steps: int = 10
    clients_per_round: int | None = None  # None: all
    lam: float = 0.01  # LoRA-FAIR's ridge
    dp_clip: float | None = None  # DP-FedAvg's clipping norm C; None: no DP
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    eval_split: str = "val"
    seed: int = 0

    def check(self) -> None:
        if self.rule not in agg.RULES:
            raise ConfigError(f"--rule {self.rule!r} is not an aggregation rule; choose one of {', '.join(agg.RULES)}.")
        for name in ("clients", "rounds", "local_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        per_round = self.clients_per_round or self.clients
        if not 1 <= per_round <= self.clients:
            raise ConfigError(f"--clients-per-round must be between 1 and --clients ({self.clients}), got {per_round}.")
        if self.dp_clip is not None:
            check_dp(self.dp_clip, self.noise_multiplier, self.delta)


def _state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().cpu() for k, v in adapter_tensors(model, name).items()}


def _labels(dataset: Any) -> list[int]:
    labels = [getattr(dataset[i], "label", -1) for i in range(len(dataset))]
    if any(label < 0 for label in labels):
        raise ConfigError(
            "the federated simulation splits a classification task's items by label (Dirichlet over "
            "labels); this task's training items have no class label (task text_classification has)."
        )
    return labels


def simulate(cfg: RunConfig, fed: FedConfig, out_dir: str | Path, log: Any = print) -> dict[str, Any]:
    """Run the simulation into ``out_dir`` (which must not exist) and return the summary."""
    fed.check()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExistingPathError(f"{out_dir} exists; the simulation writes a new run directory (choose another --out).")
    start = time.perf_counter()
    task, model, datasets = build_run(cfg)
    if fed.eval_split not in ("val", "test") or fed.eval_split not in datasets:
        raise ConfigError(f"--eval-split {fed.eval_split!r} is not a split of this run (data.{fed.eval_split}_split).")
    report = vpeft.apply_method(model, cfg.method.name, **task.method_options(cfg.method.options))
    record = adapter_record(model)
    name = active_adapter(model)
    if fed.rule == "ffa_lora" and not issubclass(record.method_cls, FFALoRA) and fed.dp_clip is None:
        raise ConfigError(
            "--rule ffa_lora aggregates FFA-LoRA adapters (A frozen and shared): set method.name=ffa_lora."
        )
    if fed.rule == "lora_fair" and not agg.lora_pairs(_state(model, name)):
        raise ConfigError(f"--rule lora_fair corrects LoRA factors; method {cfg.method.name!r} has no lora_A/lora_B.")
    trainable = sorted(k for k, v in adapter_tensors(model, name).items() if v.requires_grad)
    shares = dirichlet_split(_labels(datasets["train"]), fed.clients, fed.beta, fed.seed)
    weights_all = agg.client_weights([len(s) for s in shares])
    out_dir.mkdir(parents=True)
    dump_config(cfg, out_dir / "config.yaml")
    classes = getattr(datasets["train"], "classes", None)
    if classes is not None:
        _write_json(out_dir / "classes.json", [str(c) for c in classes])
    server = _state(model, name)
    accountant = Accountant() if fed.dp_clip is not None else None
    rng, noise = random.Random(fed.seed), torch.Generator().manual_seed(fed.seed)
    eval_loader = build_loader(
        datasets[fed.eval_split], cfg.data.eval_batch_size or cfg.data.batch_size, train=False, collate_fn=task.collate
    )
    per_round = fed.clients_per_round or fed.clients
    history = []
    log(
        f"federated: {fed.clients} clients with {[len(s) for s in shares]} items (beta {fed.beta}), {fed.rounds} "
        f"rounds of {fed.local_steps} local steps, rule {'dp_fedavg' if accountant else fed.rule}; {report.trainable} "
        "trainable parameters"
    )
    for rnd in range(fed.rounds):
        chosen = sorted(rng.sample(range(fed.clients), per_round))
        rank = draw_rank(record.config, rnd) if issubclass(record.method_cls, DyLoRA) else None
        states, losses = [], []
        for k in chosen:
            load_adapter_tensors(model, name, server, "the server's adapter")
            if rank is not None:
                for layer in layers_of(model, name):
                    layer.train_rank = rank
            losses.append(_local_train(cfg, task, model, Subset(datasets["train"], shares[k]), fed, rnd, k))
            states.append(_state(model, name))
        weights = agg.client_weights([len(shares[k]) for k in chosen])
        row: dict[str, Any] = {
            "step": rnd + 1,
            "round": rnd + 1,
            "clients": chosen,
            "train_loss": sum(losses) / len(losses),
        }
        if rank is not None:
            row["rank"] = rank
        if accountant is not None:
            server, norms = dp_fedavg(server, states, fed.dp_clip, fed.noise_multiplier, noise, trainable)
            accountant.step(fed.noise_multiplier, per_round / fed.clients)
            row.update(update_norms=norms, epsilon=accountant.epsilon(fed.delta), delta=fed.delta)
        else:
            server = agg.aggregate(fed.rule, states, weights, fed.lam)
            if agg.lora_pairs(server):
                row["residual"] = agg.residual(states, weights, server)
                row["residual_fedavg"] = agg.residual(states, weights, agg.fedavg(states, weights))
        load_adapter_tensors(model, name, server, "the aggregated adapter")
        row.update({"split": fed.eval_split, **task.evaluate(model, eval_loader, torch.device("cpu"))})
        history.append(row)
        _write_json_lines(out_dir / "metrics.jsonl", history)
        log(
            json.dumps(
                {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items() if k != "update_norms"}
            )
        )
    vpeft.save_adapter(model, out_dir / "adapter")
    summary = {
        "federated": asdict(fed),
        "client_items": [len(s) for s in shares],
        "client_weights": weights_all,
        "method": cfg.method.name,
        "trainable_params": report.trainable,
        "final": history[-1],
        "wall_seconds": time.perf_counter() - start,
    }
    if accountant is not None:
        summary["epsilon"], summary["delta"] = accountant.epsilon(fed.delta), fed.delta
    _write_json(out_dir / "summary.json", summary)
    return summary


def _local_train(
    cfg: RunConfig, task: Any, model: torch.nn.Module, data: Subset, fed: FedConfig, rnd: int, k: int
) -> float:
    """``local_steps`` AdamW steps on one client's items (reshuffled each pass); the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    model.train()
    total, step, epoch = 0.0, 0, 0
    torch.manual_seed(fed.seed * 1_000_003 + rnd * 1009 + k)  # the dropout masks of this client's round
    while step < fed.local_steps:
        loader = build_loader(
            data,
            cfg.data.batch_size,
            train=True,
            seed=fed.seed + 7919 * k,
            epoch=rnd * 1000 + epoch,
            collate_fn=task.collate,
        )
        for batch in loader:
            loss = task.loss(model, batch)
            if not math.isfinite(loss.item()):
                raise ConfigError(f"client {k} diverged in round {rnd + 1} (loss {loss.item()}); lower optim.lr.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, step = total + loss.item(), step + 1
            if step == fed.local_steps:
                break
        epoch += 1
    return total / fed.local_steps


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def _write_json_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
