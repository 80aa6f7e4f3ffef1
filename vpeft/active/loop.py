"""The active-learning loop of ``tools/star.py``: rounds of train -> evaluate -> select ``k`` over a task's train split
with its labels hidden, each round a run of the engine (:func:`vpeft.engine.train.train`, in this process).

Protocol (STAR's, arXiv:2403.01165 Sec. 4 and ``callanwu/STAR``'s ``run_star.sh``): per seed, an initial labelled set
of ``initial`` items drawn uniformly from the pool (the same for every strategy of that seed), then ``rounds``
rounds; round ``r`` trains the method from the pretrained model on the ``initial + r * k`` labelled items (a fresh
run each round, as the code relaunches its training script), scores the test split, and (but the last) labels ``k``
more items chosen by the strategy from the items not yet labelled:

``random``   ``k`` items uniformly (a generator seeded by the seed and round: the same draws on a rerun);
``entropy``  the ``k`` largest entropies of the round's model (eval mode, one pass): plain uncertainty sampling;
``star``     the ``k`` largest dynamic uncertainties (:mod:`vpeft.active.star`): the round's model scored with
             Monte-Carlo dropout mixed with the base model's entropy, the mix moving to the fine-tuned model by
             ``step`` per round; and the method trained with the ``lora_b_decay`` plug-in (STAR's constraint on B).

The base model's uncertainty is computed once per seed, as in the code. Departure: the code's base is the pretrained
causal LM itself; a classification task's pretrained model has no class distribution until a head is fit, so the
base here is the pretrained backbone frozen with a linear head (the method ``linear``) trained on the initial set,
the closest thing to "the model without LoRA" that predicts classes. Its entropies over the whole train split are
min-max normalised, as the code normalises its base values.

Each round's run directory holds ``data/train.jsonl``: the labelled items with their labels revealed (the oracle's
answers), read by the ``jsonl`` reader with the task's class names, so that the test split and the label indices are
the task's own. ``results.jsonl`` (one line per seed, strategy and round: ``labelled``, the test ``accuracy``
and ``macro_f1``, ``added`` the pool indices first labelled for that round, ``run_dir``, ``seconds``; rewritten
atomically after each round) and ``curve.png`` (test accuracy against labelled items, mean +- standard deviation over
the seeds) sit in ``out``, with ``request.json`` (the call's arguments, which a resumed call must repeat).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.text import TextExample
from ..deps import require
from ..engine import distributed
from ..engine.config import RunConfig, config_to_dict, load_config
from ..engine.run_dir import open_run
from ..engine.train import train
from ..errors import ConfigError, DataError, ExistingPathError, MissingFileError
from ..files import atomic_write
from ..tasks.text_classification import data_splits, text_options
from . import star

STRATEGIES = ("star", "random", "entropy")
TASK = "text_classification"  # a task whose train items carry a class label
DECAY_PLUGIN = "lora_b_decay"
RESULTS, CURVE, REQUEST = "results.jsonl", "curve.png", "request.json"
log = logging.getLogger("vpeft")


@dataclass(frozen=True)
class Budget:
    """``initial`` items labelled before round 0, ``k`` more after each round but the last, ``rounds`` rounds."""

    initial: int
    k: int
    rounds: int

    @property
    def total(self) -> int:
        return self.initial + self.k * (self.rounds - 1)


@dataclass(frozen=True)
class Settings:
    """STAR's selection settings: Monte-Carlo passes, the dynamic weight's step, the decay on B (0: none)."""

    mc_passes: int = star.MC_PASSES
    step: float = star.STEP
    b_decay: float = 0.5


def check_request(cfg: RunConfig, strategies: Sequence[str], budget: Budget, pool: int | None = None) -> None:
    """Refuse what cannot run, before any work: an unknown strategy, a task without class labels, a budget the pool
    cannot give (with ``pool``, the train split's size)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ConfigError(
            f"--strategies: {unknown[0]!r} is not a selection strategy; choose from {', '.join(STRATEGIES)}."
            if unknown
            else f"--strategies: name at least one of {', '.join(STRATEGIES)}."
        )
    if cfg.task != TASK:
        raise DataError(
            f"the config's task is {cfg.task!r} (key task), whose train items carry no class label to hide and reveal; "
            f"active learning here selects over a {TASK} task's train split (e.g. "
            "configs/bench/recipes/lm_wordnet16.yaml)."
        )
    if budget.initial < 1 or budget.k < 1 or budget.rounds < 1:
        raise ConfigError(f"--initial, --k and --rounds must be at least 1, got {budget}.")
    if pool is not None and budget.total > pool:
        raise ConfigError(
            f"the budget labels {budget.total} items (--initial {budget.initial} + --k {budget.k} x "
            f"{budget.rounds - 1} rounds after the first), more than the {pool} items of the train split "
            f"({cfg.data.name}); lower --initial, --k or --rounds."
        )


def run_active(
    config: str | Path,
    overrides: Sequence[str],
    out: str | Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    budget: Budget,
    settings: Settings = Settings(),
    report: Callable[[str], None] = log.info,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every strategy for every seed into ``out`` and return the result rows (also ``out/results.jsonl``).

    ``resume`` continues an interrupted call with the same request (``out/request.json``): the rounds in
    ``results.jsonl`` are kept, a round cut short is done again from its start, and each selection after a kept round
    is made again from that round's run (seeded: the same items)."""
    cfg = load_config(config, list(overrides))
    check_request(cfg, strategies, budget)
    task_options, reader_options = text_options(cfg, {"max_length": None})
    examples, classes = data_splits(cfg, "label", reader_options)
    pool = examples["train"]
    check_request(cfg, strategies, budget, len(pool))
    out = Path(out)
    request = {"config": str(config), "set": list(overrides), "strategies": list(strategies), "seeds": list(seeds),
               "budget": dataclasses.asdict(budget), "settings": dataclasses.asdict(settings)}  # fmt: skip
    done = _check_out(out, request, resume)
    test = out / "data" / "test.jsonl"
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / REQUEST, request)
        _write_jsonl(test, examples["test"], classes)
    rows: list[dict[str, Any]] = list(done.values())
    for seed in seeds:
        initial = [int(i) for i in np.random.default_rng(seed).permutation(len(pool))[: budget.initial]]
        base: np.ndarray | None = None
        for strategy in strategies:
            if strategy == "star" and base is None:
                base = _base_uncertainty(cfg, task_options, classes, pool, initial, out / f"seed{seed}" / "base", seed)
            labelled: list[int] = []
            added, choosing = initial, 0.0
            for r in range(budget.rounds):
                labelled += added
                run_dir = out / f"seed{seed}" / strategy / f"round{r}"
                if (seed, strategy, r) not in done:
                    tic = time.perf_counter()
                    shutil.rmtree(run_dir, ignore_errors=True)  # a round an interruption cut short starts again
                    star_decay = strategy == "star" and settings.b_decay > 0  # 0: STAR's selection, plain training
                    plugins = [{"name": DECAY_PLUGIN, "weight_decay": settings.b_decay}] if star_decay else []
                    round_cfg = _round_config(cfg, task_options, classes, run_dir / "data", seed, plugins=plugins)
                    _labelled_data(run_dir / "data", [pool[i] for i in labelled], classes, test)
                    summary = train(round_cfg, run_dir / "run")
                    rows.append({"seed": seed, "strategy": strategy, "round": r, "labelled": len(labelled),
                                 **{k: summary["test"][k] for k in ("accuracy", "macro_f1")}, "added": added,
                                 "run_dir": str(run_dir / "run"), "seconds": round(time.perf_counter() - tic, 1),
                                 "selection_seconds": round(choosing, 1)})  # fmt: skip
                    _write_rows(out, rows)
                    report(f"seed {seed}  {strategy:8s} round {r}  labelled {len(labelled):5d}  "
                           f"accuracy {rows[-1]['accuracy']:.2f}  {rows[-1]['seconds']:.0f} s")  # fmt: skip
                if r + 1 < budget.rounds:
                    tic = time.perf_counter()
                    kept = done.get((seed, strategy, r + 1))
                    added = kept["added"] if kept else select(strategy, run_dir / "run", pool, labelled, budget.k, r,
                                                              seed, settings, base)  # fmt: skip
                    choosing = time.perf_counter() - tic
    plot(rows, out / CURVE)
    return rows


def merge_results(parts: Sequence[str | Path], out: str | Path) -> list[dict[str, Any]]:
    """One result set from calls that ran different seeds of one request (one call per core or machine): ``out``
    gets ``results.jsonl`` (every part's rows), ``request.json`` (the request with the seeds of all parts) and
    ``curve.png``. The parts must agree in everything but their seeds, which must not overlap."""
    out, requests, rows = Path(out), [], []
    for part in map(Path, parts):
        if not (part / REQUEST).is_file():
            raise MissingFileError(f"{part / REQUEST} does not exist: {part} is not the --out of a tools/star.py call.")
        requests.append(json.loads((part / REQUEST).read_text()))
        rows += _read_rows(part)
    first = {k: v for k, v in requests[0].items() if k != "seeds"}
    for part, request in zip(parts, requests, strict=True):
        changed = sorted(k for k in first.keys() | request.keys() if k != "seeds" and first.get(k) != request.get(k))
        if changed:
            raise ConfigError(f"{part} ran another request than {parts[0]} (they differ in {changed}); only calls "
                              "that differ in --seeds can be merged.")  # fmt: skip
    seeds = [s for request in requests for s in request["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"the merged calls ran some seeds twice ({sorted(seeds)}); merge calls of disjoint --seeds.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExistingPathError(f"{out} already exists and is not empty; merge into a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / REQUEST, {**requests[0], "seeds": sorted(seeds)})
    _write_rows(out, rows)
    plot(rows, out / CURVE)
    return rows


def _check_out(out: Path, request: dict[str, Any], resume: bool) -> dict[tuple[int, str, int], dict[str, Any]]:
    """The rounds already in ``out`` by (seed, strategy, round): none for a new run (``out`` must be new or empty);
    on ``resume``, those of ``results.jsonl``, once ``out/request.json`` is found equal to ``request``."""
    if not resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExistingPathError(f"{out} already exists and is not empty; choose another --out, or pass --resume "
                                    "to continue the run there.")  # fmt: skip
        return {}
    if not (out / REQUEST).is_file():
        raise MissingFileError(f"--resume: {out / REQUEST} does not exist; {out} is not the --out of an earlier "
                               "tools/star.py call.")  # fmt: skip
    earlier = json.loads((out / REQUEST).read_text())
    changed = sorted(k for k in request.keys() | earlier.keys() if request.get(k) != earlier.get(k))
    if changed:
        raise ConfigError(f"--resume: the request differs from the one {out} was started with in {changed} "
                          f"({out / REQUEST}); resume with the same arguments, or start a new --out.")  # fmt: skip
    return {(r["seed"], r["strategy"], r["round"]): r for r in _read_rows(out)}


def _read_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.jsonl`` (none before the first round has finished)."""
    lines = (out / RESULTS).read_text().splitlines() if (out / RESULTS).is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(out / RESULTS, lambda tmp: Path(tmp).write_text(text))


def select(
    strategy: str,
    run_dir: Path,
    pool: list[TextExample],
    labelled: list[int],
    k: int,
    t: int,
    seed: int,
    settings: Settings,
    base: np.ndarray | None,
) -> list[int]:
    """The ``k`` pool indices (not in ``labelled``) that ``strategy`` labels after round ``t`` of run ``run_dir``;
    random draws come from a stream of their own per seed and round, so a rerun (or a resumed run) draws the same."""
    taken = set(labelled)
    remaining = np.array([i for i in range(len(pool)) if i not in taken])
    if strategy == "random":
        rng = np.random.default_rng([seed, 1, t])
        return [int(i) for i in remaining[star.random_k(len(remaining), k, rng)]]
    items = [pool[i] for i in remaining]
    if strategy == "entropy":
        scores = star.entropy(class_probabilities(run_dir, items, 0, seed)[0])
    else:
        passes = class_probabilities(run_dir, items, settings.mc_passes, seed * 1000 + t)
        scores = star.dynamic_uncertainty(star.mc_entropy(passes), base[remaining], t, settings.step)
    return [int(i) for i in remaining[star.top_k(scores, k)]]


def class_probabilities(run_dir: Path, items: list[TextExample], passes: int, seed: int) -> np.ndarray:
    """``(max(passes, 1), n, classes)`` softmax probabilities of the run's model on ``items``, read with their labels
    hidden: one pass in eval mode (``passes=0``), or ``passes`` with dropout on (Monte-Carlo dropout), seeded."""
    run = open_run(run_dir)
    dist = distributed.setup(run.cfg.train.device)
    device = dist.device
    model, task = run.model.to(device), run.task
    batch = run.cfg.data.eval_batch_size or run.cfg.data.batch_size
    hidden = [TextExample(e.text) for e in items]  # label -1: the selection never sees an answer
    out = []
    model.train(passes > 0)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for _ in range(max(passes, 1)):
                chunks = [task.to_device(task.collate(hidden[i : i + batch]), device)
                          for i in range(0, len(hidden), batch)]  # fmt: skip
                out.append(torch.cat([task.logits(model, b).softmax(-1).cpu() for b in chunks]))
    finally:
        model.eval()
        dist.close()
    return torch.stack(out).double().numpy()


def _base_uncertainty(
    cfg: RunConfig,
    task_options: dict[str, Any],
    classes: list[str],
    pool: list[TextExample],
    initial: list[int],
    base_dir: Path,
    seed: int,
) -> np.ndarray:
    """The base model's normalised entropy of every pool item: the frozen backbone with a linear head trained on the
    initial set (see the module's text); a finished base run in ``base_dir`` (a resumed call) is scored again."""
    if not (base_dir / "run" / "summary.json").is_file():
        shutil.rmtree(base_dir, ignore_errors=True)
        test = base_dir.parents[1] / "data" / "test.jsonl"  # out/data/test.jsonl
        _labelled_data(base_dir / "data", [pool[i] for i in initial], classes, test)
        linear = {"name": "linear"}
        base_cfg = _round_config(cfg, task_options, classes, base_dir / "data", seed, plugins=[], method=linear)
        train(base_cfg, base_dir / "run")
    return star.minmax(star.entropy(class_probabilities(base_dir / "run", pool, 0, seed)[0]))


def _round_config(
    cfg: RunConfig,
    task_options: dict[str, Any],
    classes: list[str],
    data_dir: Path,
    seed: int,
    plugins: list[dict[str, Any]],
    method: dict[str, Any] | None = None,
) -> RunConfig:
    """``cfg`` reading ``data_dir``'s jsonl files with the task's class names, seeded by ``seed``; ``plugins`` added
    to the config's (one of a name replaces it); no validation split (the curve is on the test split)."""
    d = config_to_dict(cfg)
    d["data"].update(name="jsonl", root=str(data_dir), train_split="train", val_split=None, test_split="test")
    d["data"]["options"] = {**{k: v for k, v in task_options.items() if k in cfg.data.options}, "classes": classes}
    d["train"]["seed"] = seed
    names = {p["name"] for p in plugins}
    d["plugins"] = [*(p for p in d["plugins"] if p["name"] not in names), *plugins] if method is None else plugins
    if method is not None:
        d["method"] = method
    return RunConfig.model_validate(d)


def _labelled_data(data_dir: Path, items: list[TextExample], classes: list[str], test: Path) -> None:
    """A round's jsonl data: ``train.jsonl`` the labelled ``items``, ``test.jsonl`` a link to the task's test split."""
    _write_jsonl(data_dir / "train.jsonl", items, classes)
    (data_dir / "test.jsonl").symlink_to(test.resolve())


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def _write_jsonl(path: Path, items: list[TextExample], classes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"text": e.text, "label": classes[e.label]}) + "\n" for e in items)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def curve(rows: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, list[tuple[int, float, float, int]]]:
    """Per strategy, ``(labelled, mean, standard deviation, seeds)`` of ``metric`` at each labelled count (the
    population standard deviation over the seeds; 0 for one seed)."""
    by: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        by.setdefault(row["strategy"], {}).setdefault(row["labelled"], []).append(row[metric])
    return {
        s: [(n, float(np.mean(v)), float(np.std(v)), len(v)) for n, v in sorted(points.items())]
        for s, points in by.items()
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against labelled items: one line per strategy, the band its standard deviation over seeds."""
    matplotlib = require("matplotlib", "bench", "the active-learning curve")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "bench", "the active-learning curve")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, points in curve(rows).items():
        n, mean, std = (np.array([p[i] for p in points]) for i in range(3))
        seeds = max(p[3] for p in points)
        ax.plot(n, mean, marker="o", ms=3, label=f"{strategy} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.fill_between(n, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("labelled training items")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
