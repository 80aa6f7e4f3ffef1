"""Leaderboard maths and tables: per-task mean and std over seeds, group means, both overall means.

Two overall means are in use in the literature, and both are reported, labelled:

* **Mean (groups)**: the mean of the Natural, Specialized and Structured group means, each the plain mean of its
  tasks (NOAH, VPT, SSF, FacT, SPT, GLoRA report this one);
* **Mean (tasks)**: the plain mean over all tasks, 19 on VTAB-1k (V-PETL Bench's "Mean").

NOAH's Table 1 row gives 75.48 (printed 75.5) as a group mean but 73.25 as a 19-task mean. A group mean is left blank
unless every task of the group has a result, and each overall mean unless all of its parts have one: a partial mean
is never shown as if it were the whole. Std is the sample standard deviation over seeds (``ddof=1``).

A score in percent is a proportion of test items, so the test split alone limits how well it is known: its binomial
standard error ``100 * sqrt(p (1 - p) / n)`` (p the mean score as a fraction, n the test items) sits beside the seed
std wherever the records carry ``test_size``. Two scores on test splits of that size differ beyond ``k`` standard
errors when their gap exceeds ``k * sqrt(se_a^2 + se_b^2)`` (:func:`verdict`), the suite's check against its baselines.

That SE treats the two scores as independent samples. When both were scored on the same items (the same data
config) and the records carry which items each run got right (``test_hits``), the check pairs them instead, as
McNemar's test does for two classifiers on one test set (Dietterich, Neural Computation 1998): per item ``i``, ``d_i``
is the share of the method's seeds that got it right minus the baseline's share, and the gap's SE is
``100 * std(d) / sqrt(n)``. Items both get right (or wrong) add nothing to it, so it is smaller than the unpaired SE
wherever the two models agree on most items; the gap itself is the same.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP_ORDER = ("natural", "specialized", "structured")
BEST_EPOCH = "_best_epoch"  # literature: f"{metric}_best_epoch" holds the best test score over the evaluated epochs


def metric_key(record: dict[str, Any], best_epoch: bool = False) -> str:
    """Where a record keeps its score: the task's metric (``metric``; records before it existed: ``top1``), with
    the literature protocol's best-over-epochs under ``<metric>_best_epoch``."""
    return record.get("metric", "top1") + (BEST_EPOCH if best_epoch else "")


def score(record: dict[str, Any], best_epoch: bool = False) -> float | None:
    """The record's main score on its eval split (None when absent: a failed run)."""
    return record.get(metric_key(record, best_epoch))


@dataclass
class Cell:
    """One method on one task: the metric over seeds, and the trainable parameters."""

    values: list[float]
    params: float
    params_with_head: float
    hparams: list[dict[str, Any]] = field(default_factory=list)
    test_size: int | None = None  # items on the test split (None: records that do not say)
    baseline: bool = False  # a reference row of the suite (linear probe, in-context prompting)
    hits: list[str] = field(default_factory=list)  # per seed: "0"/"1" per test item (records' ``test_hits``)
    data: list[Any] = field(default_factory=list)  # the data configs its records were scored with

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def se(self) -> float | None:
        """Binomial standard error of the mean score (percent) on the test split; None without its size."""
        return binomial_se(self.mean, self.test_size) if self.test_size else None


def binomial_se(percent: float, n: int) -> float:
    """``100 * sqrt(p (1 - p) / n)`` for a score of ``percent`` on ``n`` items."""
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def paired_se(method: Cell, baseline: Cell) -> float | None:
    """The SE of the gap from item-by-item hits (module docstring), or None when the two cells cannot be paired: a
    seed without hits, hits of different lengths, or records scored with different data configs."""
    cells = (method, baseline)
    if any(not c.hits or len(c.hits) != len(c.values) for c in cells):
        return None
    lengths = {len(h) for c in cells for h in c.hits}
    configs = [d for c in cells for d in c.data]
    if len(lengths) != 1 or any(d != configs[0] for d in configs):
        return None
    n = lengths.pop()
    if n < 2:
        return None
    shares = [[sum(h[i] == "1" for h in c.hits) / len(c.hits) for i in range(n)] for c in cells]
    diffs = [m - b for m, b in zip(*shares, strict=True)]
    return 100.0 * statistics.stdev(diffs) / math.sqrt(n)


def verdict(method: Cell, baseline: Cell, sigmas: float) -> tuple[float, float | None, bool, bool]:
    """``(gap, gap / se_of_gap, passed, paired)``: does ``method`` beat ``baseline`` by more than ``sigmas``
    standard errors of the difference? The SE is the paired one where the cells can be paired (:func:`paired_se`),
    else ``sqrt(se_m^2 + se_b^2)``; without either nothing is claimed (None, False)."""
    gap = method.mean - baseline.mean
    se = paired_se(method, baseline)
    paired = se is not None
    if se is None:
        if method.se is None or baseline.se is None:
            return gap, None, False, False
        se = math.hypot(method.se, baseline.se)
    ratio = gap / se if se > 0 else (math.inf if gap > 0 else 0.0)
    return gap, ratio, ratio > sigmas, paired


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` (0 when both are 0): CoCoOp's H of base and novel accuracy (Zhou et al., CVPR 2022)."""
    return 2 * a * b / (a + b) if a + b else 0.0


def with_columns(
    records: Iterable[dict[str, Any]], harmonic: dict[str, dict[str, str]], also_as: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """The records and, for each ``ok`` record with ``evals``, one record per eval (``task`` the eval's name, its
    score and test size) and one per harmonic mean of ``harmonic[task]`` (``{column: eval}``: the mean of the
    record's own score and that eval's, per seed, so its std is over seeds; no test size, so no SE); for each ``ok``
    record of a task in ``also_as``, a copy under each of its other column names. The added records carry
    ``column_of`` (the task); those of evals and harmonic means no best-epoch score (evals score the last epoch)."""
    out = []
    for r in records:
        out.append(r)
        if r["status"] != "ok":
            continue
        out += [r | {"task": column, "column_of": r["task"]} for column in (also_as or {}).get(r["task"], ())]
        evals = r.get("evals") or {}
        if not evals:
            continue
        key = metric_key(r)
        own = ("evals", "test_hits")  # an eval is scored on other items than the record's own test split
        base = {k: v for k, v in r.items() if not k.endswith(BEST_EPOCH) and k not in own} | {"column_of": r["task"]}
        for name, numbers in evals.items():
            out.append(base | {"task": name, key: numbers[key], "test_size": numbers.get("test_size")})
        for column, of in harmonic.get(r["task"], {}).items():
            out.append(base | {"task": column, key: harmonic_mean(r[key], evals[of][key]), "test_size": None})
    return out


def cells(records: Iterable[dict[str, Any]], protocol: str, best_epoch: bool = False) -> dict[tuple[str, str], Cell]:
    """``(method, task) -> Cell`` from the ``ok`` final-phase records of one protocol: each record's own metric, or
    its best epoch on the test split (``best_epoch``, literature)."""
    out: dict[tuple[str, str], Cell] = {}
    for r in records:
        value = score(r, best_epoch)
        if r["status"] != "ok" or r["phase"] != "final" or r["protocol"] != protocol or value is None:
            continue
        empty = Cell([], r["trainable_params"], r["trainable_params_with_head"], baseline=bool(r.get("baseline")))
        cell = out.setdefault((r["method"], r["task"]), empty)
        cell.values.append(float(value))
        if r.get("test_hits") and not best_epoch:
            cell.hits.append(r["test_hits"])
        cell.data.append((r.get("config") or {}).get("data"))
        if r.get("test_size"):
            cell.test_size = max(cell.test_size or 0, int(r["test_size"]))
        if r["hparams"] and r["hparams"] not in cell.hparams:
            cell.hparams.append(r["hparams"])
    return out


def summary(per_task: dict[str, float], tasks: Sequence[tuple[str, str]]) -> dict[str, float | None]:
    """Group means, the mean of the group means and the mean over tasks, for one method.

    Args:
        per_task: task -> its score (mean over seeds); tasks without a score are absent.
        tasks: ``(task, group)`` for every task of the suite, in order.

    Returns:
        ``{group: mean or None, ..., "mean_groups": ..., "mean_tasks": ...}``; None wherever a part is missing.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for task, group in tasks:
        groups[group].append(task)
    out: dict[str, float | None] = {}
    for group, members in groups.items():
        complete = all(t in per_task for t in members)
        out[group] = statistics.fmean(per_task[t] for t in members) if complete else None
    group_values = [out[g] for g in groups]
    out["mean_groups"] = statistics.fmean(group_values) if len(groups) > 1 and None not in group_values else None
    complete = all(t in per_task for t, _ in tasks)
    out["mean_tasks"] = statistics.fmean(per_task[t] for t, _ in tasks) if complete and tasks else None
    return out


def rows(
    found: dict[tuple[str, str], Cell], tasks: Sequence[tuple[str, str]], means: bool = True
) -> list[dict[str, Any]]:
    """One row per method, best ``mean_groups`` (then ``mean_tasks``, then tasks done) first; without ``means``
    (columns that are not tasks to average) every mean is None and the best score on the first column comes first."""
    methods = sorted({m for m, _ in found})
    out = []
    for method in methods:
        mine = {t: found[(method, t)] for t, _ in tasks if (method, t) in found}
        stats = summary({t: c.mean for t, c in mine.items()}, tasks)
        if not means:
            stats = dict.fromkeys(stats)
        params = [c.params for c in mine.values()]
        out.append(
            {
                "method": method,
                "cells": mine,
                "params": statistics.fmean(params) if params else None,
                "params_with_head": statistics.fmean(c.params_with_head for c in mine.values()) if mine else None,
                "seeds": max((len(c.values) for c in mine.values()), default=0),
                "baseline": any(c.baseline for c in mine.values()),
                **stats,
            }
        )

    first = tasks[0][0] if tasks else None

    def rank(row):
        lead = row["cells"][first].mean if first in row["cells"] else -1.0
        return tuple(-(row[k] if row[k] is not None else -1.0) for k in ("mean_groups", "mean_tasks")) + (
            -len(row["cells"]),
            -lead,
        )

    return sorted(out, key=rank)


def check(table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], method: str, sigmas: float) -> list[dict]:
    """Per task: ``method`` against the best baseline row on that task (highest mean), by :func:`verdict`.

    A task where either side has no result says so (``passed`` None) instead of passing or failing.
    """
    mine = next((row for row in table if row["method"] == method), None)
    out = []
    for task, _ in tasks:
        cell = mine["cells"].get(task) if mine else None
        bases = [(row["cells"][task], row["method"]) for row in table if row["baseline"] and task in row["cells"]]
        best = max(bases, key=lambda b: b[0].mean, default=None)
        entry = {"task": task, "method": method, "sigmas": sigmas, "cell": cell, "baseline": None, "base_cell": None,
                 "gap": None, "ratio": None, "passed": None, "paired": False}  # fmt: skip
        if cell is not None and best is not None:
            gap, ratio, passed, paired = verdict(cell, best[0], sigmas)
            entry.update(baseline=best[1], base_cell=best[0], gap=gap, ratio=ratio, passed=passed, paired=paired)
        out.append(entry)
    return out


def check_markdown(checked: list[dict[str, Any]]) -> str:
    """The check as a table: scores with their standard errors, the gap, the gap in standard errors, pass/fail."""
    if not checked:
        return ""
    method, sigmas = checked[0]["method"], checked[0]["sigmas"]
    lines = [
        f"| task | `{method}` | best baseline | gap | gap / SE | SE of the gap | > {sigmas:g} SE |",
        "|" + " --- |" * 7,
    ]
    for c in checked:
        if c["passed"] is None:
            missing = f"no `{method}` result" if c["cell"] is None else "no baseline result"
            lines.append(f"| {c['task']} | {_cell(c['cell'])} | | | | | {missing} |")
            continue
        ratio = "" if c["ratio"] is None else f"{c['ratio']:.1f}"
        verdict_text = "pass" if c["passed"] else ("fail" if c["ratio"] is not None else "no test size")
        kind = "paired" if c["paired"] else "unpaired"
        lines.append(f"| {c['task']} | {_cell(c['cell'])} | `{c['baseline']}` {_cell(c['base_cell'])} | "
                     f"{c['gap']:+.2f} | {ratio} | {kind} | {verdict_text} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    return text + (f" (SE {cell.se:.2f})" if cell.se is not None else "")


def _name(row: dict[str, Any]) -> str:
    return f"`{row['method']}`" + (" (baseline)" if row.get("baseline") else "")


def _params(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def groups_of(tasks: Sequence[tuple[str, str]]) -> list[str]:
    seen = list(dict.fromkeys(g for _, g in tasks))
    return sorted(seen, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER))


def markdown(
    table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], heading: str, caption: str, means: bool = True
) -> str:
    """The summary table (groups and both means) and the per-task table of one protocol and metric; without
    ``means`` (columns that are not tasks to average, such as base, novel and their harmonic mean) one table per
    group, each with the parameters and seeds."""
    if not means:
        return _group_tables(table, tasks, heading, caption)
    groups = groups_of(tasks)
    multi = len(groups) > 1
    head = ["method", "params (no head)", *(g.capitalize() for g in groups)]
    head += ["Mean (groups)"] if multi else []
    head += [f"Mean ({len(tasks)} tasks)", "seeds"]
    lines = [f"### {heading}", "", caption, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table:
        cols = [_name(row), _params(row["params"]), *(_num(row[g]) for g in groups)]
        cols += [_num(row["mean_groups"])] if multi else []
        cols += [_num(row["mean_tasks"]), str(row["seeds"])]
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "| method | " + " | ".join(t for t, _ in tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for row in table:
        lines.append(f"| {_name(row)} | " + " | ".join(_cell(row["cells"].get(t)) for t, _ in tasks) + " |")
    return "\n".join(lines) + "\n"


def _group_tables(table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], heading: str, caption: str) -> str:
    lines = [f"### {heading}", "", caption]
    for group in groups_of(tasks):
        columns = [t for t, g in tasks if g == group]
        mine = [row for row in table if any(c in row["cells"] for c in columns)]
        if not mine:
            continue
        lines += ["", f"**{group}**", "", "| method | params (no head) | seeds | " + " | ".join(columns) + " |"]
        lines.append("|" + " --- |" * (len(columns) + 3))
        for row in mine:
            cells_ = [row["cells"].get(c) for c in columns]
            params = statistics.fmean(c.params for c in cells_ if c is not None)
            seeds = max(len(c.values) for c in cells_ if c is not None)
            lines.append(f"| {_name(row)} | {_params(params)} | {seeds} | " + " | ".join(map(_cell, cells_)) + " |")
    return "\n".join(lines) + "\n"


def published_rows_markdown(
    path: Path, ours: dict[str, list[dict[str, Any]]], columns: Sequence[str], note: str
) -> str:
    """Published rows (``path``: ``method``, some of ``columns``, ``vpeft_method``, ``source``) each followed by our
    rows of the same method (``ours``: protocol -> leaderboard rows), column by column."""
    with open(path, newline="") as handle:
        published = list(csv.DictReader(handle))
    shown = [c for c in columns if published and c in published[0]]
    lines = ["## Published numbers", "", note, "", "| method | " + " | ".join(shown) + " | source |"]
    lines.append("|" + " --- |" * (len(shown) + 2))
    for row in published:
        lines.append(f"| {row['method']} | " + " | ".join(row[c] for c in shown) + f" | {row.get('source', '')} |")
        for protocol, table in ours.items():
            for mine in (r for r in table if row.get("vpeft_method") and r["method"] == row["vpeft_method"]):
                values = " | ".join(_cell(mine["cells"].get(c)) for c in shown)
                lines.append(f"| ours: {_name(mine)}, {protocol} | {values} | this leaderboard |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], protocol: str, metric: str) -> str:
    """One row per method: params, per-task mean, std and test-split standard error, group means, both overall
    means."""
    groups = groups_of(tasks)
    head = ["protocol", "metric", "method", "params", "params_with_head", "seeds", "baseline"]
    head += [f"{t}{s}" for t, _ in tasks for s in ("", "_std", "_se")] + groups + ["mean_groups", "mean_tasks"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for row in table:
        values = [protocol, metric, row["method"], row["params"], row["params_with_head"], row["seeds"]]
        values.append(int(row["baseline"]))
        for t, _ in tasks:
            cell = row["cells"].get(t)
            values += [cell.mean if cell else ""]
            values += [getattr(cell, key) if cell and getattr(cell, key) is not None else "" for key in ("std", "se")]
        values += [row[g] if row[g] is not None else "" for g in groups]
        values += [row[k] if row[k] is not None else "" for k in ("mean_groups", "mean_tasks")]
        writer.writerow(["" if v is None else round(v, 4) if isinstance(v, float) else v for v in values])
    return buffer.getvalue()


def read_published(path: Path, tasks: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Published rows (``published/<suite>.csv``) with group and overall means recomputed from per-task numbers.

    Rows that give only group numbers keep them (``natural``, ``specialized``, ``structured``, ``mean_groups``
    columns), and their task mean stays blank.
    """
    out = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            per_task = {t: float(raw[t]) for t, _ in tasks if raw.get(t)}
            stats = summary(per_task, tasks)
            for key in (*groups_of(tasks), "mean_groups"):
                if stats.get(key) is None and raw.get(key):
                    stats[key] = float(raw[key])
            out.append({**raw, "per_task": per_task, **stats})
    return out


def published_markdown(published: list[dict[str, Any]], ours: list[dict[str, Any]], tasks, note: str) -> str:
    """Published rows beside ours (same method name in ``vpeft``), each with its source."""
    groups = groups_of(tasks)
    overall = "mean_groups" if len(groups) > 1 else "mean_tasks"
    mine = {row["method"]: row for row in ours}
    head = ["method (paper)", "params (M)", *(g.capitalize() for g in groups)]
    head += ["Mean (groups)", f"Mean ({len(tasks)} tasks)"] if len(groups) > 1 else [f"Mean ({len(tasks)} tasks)"]
    head += [f"ours: {head[-1 if overall == 'mean_tasks' else -2]}", "source"]
    lines = [note, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in published:
        ours_row = mine.get(row.get("vpeft_method") or "")
        cols = [row["method"], row.get("params_m", ""), *(_num(row[g]) for g in groups)]
        cols += [_num(row["mean_groups"]), _num(row["mean_tasks"])] if len(groups) > 1 else [_num(row["mean_tasks"])]
        cols += [_num(ours_row[overall]) if ours_row else "", row.get("source", "")]
        lines.append("| " + " | ".join(str(c) for c in cols) + " |")
    return "\n".join(lines) + "\n"
