"""Leaderboard maths and tables: per-task mean and std over seeds, group means, both overall means.

Two overall means are in use in the literature, and both are reported, labelled:

* **Mean (groups)**: the mean of the Natural, Specialized and Structured group means, each the plain mean of its
  tasks (NOAH, VPT, SSF, FacT, SPT, GLoRA report this one);
* **Mean (tasks)**: the plain mean over all tasks, 19 on VTAB-1k (V-PETL Bench's "Mean").

NOAH's Table 1 row gives 75.48 (printed 75.5) as a group mean but 73.25 as a 19-task mean. A group mean is left blank
unless every task of the group has a result, and each overall mean unless all of its parts have one: a partial mean
is never shown as if it were the whole. Std is the sample standard deviation over seeds (``ddof=1``).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP_ORDER = ("natural", "specialized", "structured")


@dataclass
class Cell:
    """One method on one task: the metric over seeds, and the trainable parameters."""

    values: list[float]
    params: float
    params_with_head: float
    hparams: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def cells(records: Iterable[dict[str, Any]], protocol: str, metric: str = "top1") -> dict[tuple[str, str], Cell]:
    """``(method, task) -> Cell`` from the ``ok`` final-phase records of one protocol."""
    out: dict[tuple[str, str], Cell] = {}
    for r in records:
        if r["status"] != "ok" or r["phase"] != "final" or r["protocol"] != protocol or r.get(metric) is None:
            continue
        empty = Cell([], r["trainable_params"], r["trainable_params_with_head"])
        cell = out.setdefault((r["method"], r["task"]), empty)
        cell.values.append(float(r[metric]))
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


def rows(found: dict[tuple[str, str], Cell], tasks: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per method, best ``mean_groups`` (then ``mean_tasks``, then tasks done) first."""
    methods = sorted({m for m, _ in found})
    out = []
    for method in methods:
        mine = {t: found[(method, t)] for t, _ in tasks if (method, t) in found}
        stats = summary({t: c.mean for t, c in mine.items()}, tasks)
        params = [c.params for c in mine.values()]
        out.append(
            {
                "method": method,
                "cells": mine,
                "params": statistics.fmean(params) if params else None,
                "params_with_head": statistics.fmean(c.params_with_head for c in mine.values()) if mine else None,
                "seeds": max((len(c.values) for c in mine.values()), default=0),
                **stats,
            }
        )

    def rank(row):
        return tuple(-(row[k] if row[k] is not None else -1.0) for k in ("mean_groups", "mean_tasks")) + (
            -len(row["cells"]),
        )

    return sorted(out, key=rank)


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(cell: Cell | None) -> str:
    if cell is None:
        return ""
    return f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")


def _params(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    return f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def groups_of(tasks: Sequence[tuple[str, str]]) -> list[str]:
    seen = list(dict.fromkeys(g for _, g in tasks))
    return sorted(seen, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER))


def markdown(table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], heading: str, caption: str) -> str:
    """The summary table (groups and both means) and the per-task table of one protocol and metric."""
    groups = groups_of(tasks)
    multi = len(groups) > 1
    head = ["method", "params (no head)", *(g.capitalize() for g in groups)]
    head += ["Mean (groups)"] if multi else []
    head += [f"Mean ({len(tasks)} tasks)", "seeds"]
    lines = [f"### {heading}", "", caption, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in table:
        cols = [f"`{row['method']}`", _params(row["params"]), *(_num(row[g]) for g in groups)]
        cols += [_num(row["mean_groups"])] if multi else []
        cols += [_num(row["mean_tasks"]), str(row["seeds"])]
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "| method | " + " | ".join(t for t, _ in tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for row in table:
        lines.append(f"| `{row['method']}` | " + " | ".join(_cell(row["cells"].get(t)) for t, _ in tasks) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], protocol: str, metric: str) -> str:
    """One row per method: params, per-task mean and std, group means, both overall means."""
    groups = groups_of(tasks)
    head = ["protocol", "metric", "method", "params", "params_with_head", "seeds"]
    head += [f"{t}{s}" for t, _ in tasks for s in ("", "_std")] + groups + ["mean_groups", "mean_tasks"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for row in table:
        values = [protocol, metric, row["method"], row["params"], row["params_with_head"], row["seeds"]]
        for t, _ in tasks:
            cell = row["cells"].get(t)
            values += [cell.mean if cell else "", cell.std if cell and cell.std is not None else ""]
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
