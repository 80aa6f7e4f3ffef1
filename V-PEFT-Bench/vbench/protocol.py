"""The two protocols as plans of runs; the numbers they report and how they are labelled.

``standard`` (VPT's tuning protocol, Jia et al. 2022, and PETL_Vision's ``final_acc_hp``): every grid point
(``optim.lr`` x ``optim.weight_decay`` by default) trains on the tune split (``train800``) with the first seed and is
scored by its **last-epoch** accuracy on the held-out split (``val200``); the best point (ties: the earlier point in
grid order, so list values ascending to prefer the smaller lr, as VPT's ``tune_vtab.py`` does) is retrained on the
final split (``train800val200``) with every seed, and the **last-epoch** test accuracy is reported as mean and std
over the seeds. The test split is never looked at before the report.

``literature`` (NOAH lineage: NOAH, FacT, V-PETL): the recipe's fixed hyperparameters, trained on the final split,
the test split evaluated every ``eval_every`` epochs. Both the last-epoch accuracy and the **best test accuracy over
epochs** (model selection on the test set, as NOAH#6 confirms for NOAH) are recorded; the second exists only to sit
beside published tables and is always labelled as such.

``quick`` (CI-sized runs): the recipe's fixed hyperparameters, no grid, trained on the final split and scored at the
end of training on the test split. It is ``standard`` without the search, for smoke runs and budgets.

The metric is each task's own (``Task.metric``: top-1 for images, accuracy or exact match for text); the plans do not
depend on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpeft.errors import ConfigError

from .suite import Protocol, Suite, TaskRef

PROTOCOLS = ("standard", "literature", "quick")
LABELS = {
    ("standard", False): "standard: {grid} tuned on {tune} (last epoch), retrained on {final}, last-epoch {eval}",
    ("literature", False): "literature: the recipe's fixed lr/wd, trained on {final}, last-epoch {eval}",
    ("literature", True): "literature: fixed lr/wd, trained on {final}, BEST EPOCH ON {eval} "
    "(model selection on the test set)",
    ("quick", False): "quick: the recipe's fixed lr/wd, trained on {final}, {eval} at the end of training",
}
REPORTED = {"standard": (False,), "literature": (True, False), "quick": (False,)}  # best_epoch flags per protocol


def label(protocol: str, best_epoch: bool, spec: Protocol, fixed: Sequence[str] = ()) -> str:
    """The sentence printed next to every number a protocol produces (``fixed``: grid keys the user set)."""
    tune = "->".join(spec.tune) if spec.tune else "-"
    grid = "/".join(k.split(".")[-1] for k in spec.grid if k not in fixed) or "nothing"
    return LABELS[(protocol, best_epoch)].format(grid=grid, tune=tune, final=spec.final[0], eval=spec.final[1])


@dataclass(frozen=True)
class MethodRef:
    """A method as the harness runs it: ``label`` names the variant (``lora`` or ``lora:r=16``); a suite's baseline
    runs only on its ``tasks`` (None: every task) and, with ``tune`` false, with the recipe's hyperparameters."""

    label: str
    name: str
    overrides: tuple[str, ...] = ()
    tasks: tuple[str, ...] | None = None
    tune: bool = True
    baseline: bool = False
    seeds: int | None = None  # at most this many of the sweep's seeds (None: all)

    def applies_to(self, task: TaskRef) -> bool:
        return self.tasks is None or task.name in self.tasks


def parse_method(text: str, suite: Suite | None = None) -> MethodRef:
    """``lora`` or ``lora:r=16:alpha=16`` (method options after colons) -> :class:`MethodRef`; a name among the
    suite's ``variants`` (``lora_both:r=2``) is its method with the variant's ``set``, then the options."""
    name, *options = text.strip().split(":")
    for option in options:
        if "=" not in option:
            raise ConfigError(f"method {text!r}: option {option!r} is not key=value (e.g. lora:r=16)")
    variant = suite.variants.get(name) if suite is not None else None
    first = (variant.method, tuple(variant.set)) if variant else (name, ())
    return MethodRef(text.strip(), first[0], (*first[1], *(f"method.{o}" for o in options)))


def baselines(suite: Suite) -> list[MethodRef]:
    """The suite's baseline rows as methods: ``frozen_3shot`` is method ``frozen`` with its ``set``, on its tasks."""
    return [
        MethodRef(label, spec.method or label, tuple(spec.set), tuple(spec.tasks) if spec.tasks else None, spec.tune,
                  baseline=True, seeds=spec.seeds)
        for label, spec in suite.baselines.items()
    ]  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan; ``overrides`` turn the suite's recipe into its run config."""

    suite: str
    protocol: str
    phase: str  # "tune" or "final"
    task: TaskRef
    method: MethodRef
    seed: int
    point: tuple[tuple[str, Any], ...]  # the grid point (standard) or () (literature)
    overrides: tuple[str, ...]

    @property
    def rel_dir(self) -> Path:
        """Where the run lives under the output folder: protocol/task/method/phase/tag."""
        point = "_".join(f"{k.split('.')[-1]}={v}" for k, v in self.point) if self.phase == "tune" else ""
        tag = f"{point}_seed={self.seed}" if point else f"seed={self.seed}"  # final: the point is in the record
        method = self.method.label.replace(":", "_").replace("/", "_")
        return Path(self.protocol) / self.task.name / method / self.phase / tag


def grid_points(grid: dict[str, Sequence[Any]], fixed: Sequence[str] = ()) -> list[tuple[tuple[str, Any], ...]]:
    """Cartesian product of the grid in key order, values in listed order; keys in ``fixed`` are left out."""
    keys = [k for k in grid if k not in fixed]
    return [tuple(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def select(scored: Sequence[tuple[tuple[tuple[str, Any], ...], float | None]]) -> tuple[tuple[str, Any], ...] | None:
    """The grid point with the highest score; ties go to the earlier point; failed points (None) never win."""
    best = None
    for point, score in scored:
        if score is not None and (best is None or score > best[1]):
            best = (point, score)
    return best[0] if best else None


def _method_set(table: dict[str, list[str]], method: MethodRef) -> list[str]:
    """A ``method_set``'s overrides for ``method``: its name's, then its variant's (``corda:mode=kpm``), which then win
    where both set a key."""
    variant = table.get(method.label, []) if method.label != method.name else []
    return [*table.get(method.name, []), *variant]


def _base(suite: Suite, task: TaskRef, method: MethodRef, protocol: str) -> list[str]:
    return [
        *suite.set,
        *task.overrides,
        *([f"data.root={task.root}"] if task.root is not None else []),
        f"method.name={method.name}",
        *_method_set(suite.method_set, method),
        *_method_set(task.method_set, method),
        *method.overrides,
        *suite.protocol(protocol).set,
    ]


def _seeded(suite: Suite, seed: int) -> list[str]:
    """``train.seed`` and the suite's ``seed_keys`` (the shots a few-shot sampler draws) set to the run's seed."""
    return [f"{key}={seed}" for key in ("train.seed", *suite.seed_keys)]


def _split_overrides(train: str, val: str | None, test: str) -> list[str]:
    return [f"data.train_split={train}", f"data.val_split={val if val else 'null'}", f"data.test_split={test}"]


def tune_runs(
    suite: Suite,
    task: TaskRef,
    method: MethodRef,
    seed: int,
    user_set: Sequence[str] = (),
    protocol: str = "standard",
) -> list[RunSpec]:
    """The grid-search runs of ``protocol`` (none for a protocol without a tune split or a method that is not tuned)."""
    spec = suite.protocol(protocol)
    if spec.tune is None or not method.tune:
        return []
    fixed = [item.split("=", 1)[0] for item in user_set]
    runs = []
    for point in grid_points(spec.grid, fixed):
        overrides = [
            *_base(suite, task, method, protocol),
            *_split_overrides(spec.tune[0], None, spec.tune[1]),
            *(f"{k}={v}" for k, v in point),
            *_seeded(suite, seed),
            *user_set,
        ]
        runs.append(RunSpec(suite.name, protocol, "tune", task, method, seed, point, tuple(overrides)))
    return runs


def final_runs(
    suite: Suite,
    protocol: str,
    task: TaskRef,
    method: MethodRef,
    seeds: Sequence[int],
    point: tuple[tuple[str, Any], ...] = (),
    user_set: Sequence[str] = (),
) -> list[RunSpec]:
    """The reported runs: one per seed, with the selected grid point (standard) or the recipe (literature)."""
    spec = suite.protocol(protocol)
    train, evaluate = spec.final
    if protocol == "literature":
        splits = [*_split_overrides(train, evaluate, evaluate), f"train.eval_every={spec.eval_every}"]
    else:
        splits = _split_overrides(train, None, evaluate)
    runs = []
    for seed in seeds:
        overrides = [
            *_base(suite, task, method, protocol),
            *splits,
            *(f"{k}={v}" for k, v in point),
            *_seeded(suite, seed),
            *user_set,
        ]
        runs.append(RunSpec(suite.name, protocol, "final", task, method, seed, point, tuple(overrides)))
    return runs


def parse_seeds(text: str, suite: Suite) -> list[int]:
    """``3`` -> the suite's first three seeds; ``42,7`` -> exactly those."""
    if "," not in text and text.strip().isdigit():
        count = int(text)
        if not 1 <= count <= len(suite.seeds):
            raise ConfigError(f"--seeds {count}: suite {suite.name!r} lists {len(suite.seeds)} seeds {suite.seeds}")
        return suite.seeds[:count]
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3) or a comma-separated list (42,44)") from None
