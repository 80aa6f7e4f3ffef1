"""AutoPEFT: multi-objective Bayesian optimisation of a PEFT configuration (Zhou, Wan, Vulic and Korhonen,
"AutoPEFT: Automatic Configuration Search for Parameter-Efficient Fine-Tuning", TACL 2024, arXiv:2301.12132).

The search maximises the task score and minimises the trainable parameters together; the result is the Pareto front
of configurations (no other trial is at least as good in both and better in one). Each trial is a low-fidelity run
(a reduced step budget, scored on the validation split), as the paper's search is before the chosen configuration
is trained in full.

Search space (the paper's Sec. 3, mapped onto vpeft's LoRA): ``layer_i`` in {0, 1} for each of the model's L blocks
(the paper's per-layer insertion, ``leave_out``), ``log2_r`` in {0, ..., 4} (r = 1 to 16; the paper searches the
adapters' bottleneck sizes on a log2 grid), and two placement flags, ``attn`` (q and v) and ``ffn`` (the MLP's input
and output projections; at least one is on). A configuration with no layer or no placement adapts nothing and is not
a trial: it is told to the study as pruned, and a random valid configuration is evaluated in its place. The Gaussian
process fits completed trials only, so without that it proposes the same empty configuration again and again (the
parameter objective pulls it there, and the search never advances). Departure: the paper's space combines serial
adapters, parallel adapters and prefix tuning in one model (its modified adapter-transformers); here one method
(LoRA, or any with ``r``) is configured, since vpeft activates one adapter at a time.

The optimiser is optuna's ``GPSampler`` (a Gaussian process with a Matern-5/2 ARD kernel and log expected hypervolume
improvement for several objectives) after ``startup`` random trials (Sobol in the paper; optuna's random sampler
here); the paper uses BoTorch's GP with the noisy expected hypervolume improvement. optuna comes with the ``search``
extra.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..deps import require
from ..errors import ConfigError, ExistingPathError
from ..files import atomic_write

Objective = Callable[[dict[str, Any]], tuple[float, int]]


def block_indices(targets: Sequence[str]) -> list[int]:
    """The block indices of adapted module paths: the first integer in each path (``MethodConfig.layers``' rule)."""
    found = {int(m.group()) for t in targets if (m := re.search(r"\d+", t))}
    return sorted(found)


def overrides(params: dict[str, Any], layers: Sequence[int]) -> list[str] | None:
    """The ``--set`` edits of one sampled configuration, or None when it adapts nothing."""
    chosen = [i for i in layers if params[f"layer_{i}"]]
    targets = [*(["q", "v"] if params["attn"] else []), *(["mlp_in", "mlp_out"] if params["ffn"] else [])]
    if not chosen or not targets:
        return None
    return [f"method.r={2 ** params['log2_r']}", f"method.targets=[{', '.join(targets)}]", f"method.layers={chosen}"]


def random_configuration(rng: random.Random, layers: Sequence[int]) -> dict[str, int]:
    """A point of the search space that adapts something: at least one layer and at least one placement."""
    chosen = {i: rng.randint(0, 1) for i in layers}
    if not any(chosen.values()):
        chosen[rng.choice(list(layers))] = 1
    attn, ffn = rng.choice([(1, 0), (0, 1), (1, 1)])
    return {**{f"layer_{i}": on for i, on in chosen.items()}, "log2_r": rng.randint(0, 4), "attn": attn, "ffn": ffn}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (score, params) that no other point dominates (score >= and params <=, one strict)."""
    front = []
    for i, (s, p) in enumerate(points):
        dominated = any(s2 >= s and p2 <= p and (s2 > s or p2 < p) for j, (s2, p2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def search(
    evaluate: Callable[[list[str]], tuple[float, int]],
    layers: Sequence[int],
    trials: int,
    out_dir: str | Path,
    startup: int = 5,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``trials`` configurations, ``evaluate(overrides) -> (score, trainable params)`` each; write
    ``trials.jsonl``, ``pareto.json`` and ``pareto.png`` into ``out_dir`` and return the Pareto summary."""
    optuna = require("optuna", "search", "AutoPEFT's Bayesian optimisation")
    if trials < 1 or startup < 1:
        raise ConfigError(f"--trials and --startup must be at least 1, got {trials} and {startup}.")
    if not layers:
        raise ConfigError("the model has no block to adapt (no adapted module path holds a block index).")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExistingPathError(f"{out_dir} exists; AutoPEFT writes a new directory (choose another --out).")
    out_dir.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=startup, independent_sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    while len(records) < trials:
        trial = study.ask()
        params = {f"layer_{i}": trial.suggest_int(f"layer_{i}", 0, 1) for i in layers}
        params.update(
            log2_r=trial.suggest_int("log2_r", 0, 4),
            attn=trial.suggest_int("attn", 0, 1),
            ffn=trial.suggest_int("ffn", 0, 1),
        )
        edits = overrides(params, layers)
        if edits is None:  # adapts nothing: the next ask evaluates a random valid configuration instead
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            study.enqueue_trial(random_configuration(rng, layers))
            continue
        score, params_count = evaluate(edits)
        study.tell(trial, [score, params_count])
        records.append({"trial": len(records), "set": edits, "score": score, "params": params_count, "space": params})
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(out_dir / "trials.jsonl", lambda tmp, text=text: Path(tmp).write_text(text))
        log(json.dumps({k: records[-1][k] for k in ("trial", "set", "score", "params")}))
    front = pareto_front([(r["score"], r["params"]) for r in records])
    summary = {
        "trials": len(records),
        "pareto": [records[i] for i in sorted(front, key=lambda i: records[i]["params"])],
    }
    atomic_write(out_dir / "pareto.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    plot(records, front, out_dir / "pareto.png")
    return summary


def plot(records: list[dict[str, Any]], front: list[int], path: Path) -> None:
    """Score against trainable parameters (log scale), the Pareto front joined."""
    matplotlib = require("matplotlib", "search", "the Pareto plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "search", "the Pareto plot")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([r["params"] for r in records], [r["score"] for r in records], c="0.6", s=18, label="trials")
    best = sorted((records[i] for i in front), key=lambda r: r["params"])
    ax.plot([r["params"] for r in best], [r["score"] for r in best], "o-", c="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation score")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
