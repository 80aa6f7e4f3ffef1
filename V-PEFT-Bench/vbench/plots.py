"""PNG plots of a leaderboard (matplotlib, Agg backend: no display needed).

* ``accuracy_vs_params.png``: the overall mean of each method against its trainable parameters without the head
  (symmetric-log x axis, so the linear probe's 0 sits at the left edge);
* ``per_task_heatmap.png``: methods x tasks, the mean score (top-1, accuracy, exact match) over seeds in each cell;
* ``<task>_vs_<eval>.png``: a task's own score against one of its evals per method (a harmonic-mean column's two
  sides: CLIP's base against novel accuracy, the base-to-novel trade-off).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vpeft.files import atomic_write  # noqa: E402


def _overall(row: dict[str, Any]) -> tuple[float | None, str]:
    if row.get("mean_groups") is not None:
        return row["mean_groups"], "Mean (groups)"
    if row.get("mean_tasks") is not None:
        return row["mean_tasks"], "Mean (tasks)"
    return None, ""


def accuracy_vs_params(table: list[dict[str, Any]], path: Path, title: str, metric: str = "top-1") -> Path | None:
    """Scatter of the overall mean against trainable parameters; methods without a complete mean are left out."""
    points = [(row["params"], *_overall(row), row["method"]) for row in table if _overall(row)[0] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for params, score, _, method in points:
        ax.scatter(params, score, s=30)
        ax.annotate(method, (params, score), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("symlog", linthresh=1e3)
    ax.set_xlabel("trainable parameters without the head (symlog)")
    ax.set_ylabel(f"{metric} (%), {points[0][2]}")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(
    table: list[dict[str, Any]], tasks: Sequence[tuple[str, str]], path: Path, title: str, metric: str = "top-1"
) -> Path | None:
    """Methods (rows, leaderboard order) x tasks (columns, suite order), blank where there is no result."""
    if not table:
        return None
    names = [t for t, _ in tasks]
    grid = np.full((len(table), len(names)), np.nan)
    for i, row in enumerate(table):
        for j, task in enumerate(names):
            if task in row["cells"]:
                grid[i, j] = row["cells"][task].mean
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 1.2 + 0.32 * len(table)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=100)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(table)), [row["method"] for row in table], fontsize=7)
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    fig.colorbar(image, ax=ax, label=f"{metric} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff(table: list[dict[str, Any]], x: str, y: str, path: Path, title: str) -> Path | None:
    """Each method's mean score on column ``y`` against its mean on ``x`` (bars: sample std over seeds); baselines
    as squares. With ``x`` the base classes and ``y`` the novel ones it is the base-to-novel trade-off: a method right
    of the zero-shot square gained on base, one below it lost novel accuracy (CoCoOp's generalisation gap)."""
    points = [row for row in table if x in row["cells"] and y in row["cells"]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for row in points:
        if row["baseline"]:  # the reference's quadrants: right of it gained on x, below it lost on y
            ax.axvline(row["cells"][x].mean, color="grey", lw=0.8, ls=":")
            ax.axhline(row["cells"][y].mean, color="grey", lw=0.8, ls=":")
    colour = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(row["method"] for row in points))}
    for row in points:  # colours by name, so one method has one colour in every protocol's plot
        cx, cy = row["cells"][x], row["cells"][y]
        ax.errorbar(cx.mean, cy.mean, xerr=cx.std or 0.0, yerr=cy.std or 0.0, fmt="s" if row["baseline"] else "o",
                    capsize=3, label=row["method"], color=colour[row["method"]])  # fmt: skip
    ax.set_xlabel(f"{x} (%)")
    ax.set_ylabel(f"{y} (%)")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
