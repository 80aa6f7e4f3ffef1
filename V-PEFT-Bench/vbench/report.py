"""Write a suite's leaderboard: markdown, CSV per protocol, PNG plots, the published table and ``runs.jsonl``.

``runs.jsonl`` holds every record (of the resolved config only its ``data`` section, which says whether two runs were
scored on the same items; ``overrides`` plus the recipe and the git commit rebuild the rest), so a committed
leaderboard is regenerated from it alone::

    python V-PEFT-Bench/leaderboard.py --suite minivtab --results V-PEFT-Bench/results/minivtab/runs.jsonl
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from vpeft.files import atomic_write

from . import board, plots
from .board import BEST_EPOCH
from .protocol import PROTOCOLS, REPORTED, label
from .suite import ROOT, Suite

PUBLISHED = ROOT / "V-PEFT-Bench" / "published"
MEANS = (
    "Top-1 (%) on the test split, mean ± sample std over seeds. **Mean (groups)** = mean of the Natural, "
    "Specialized and Structured group means (NOAH/VPT/SSF/FacT convention); **Mean (tasks)** = plain mean over the "
    'tasks (V-PETL Bench\'s "Mean"). Blank = some part has no result yet. Params: trainable parameters without the '
    "classification head, averaged over tasks."
)


CHECK = (
    "SE: the binomial standard error of a mean score on the test split, 100 sqrt(p(1-p)/n). The gap's SE is paired "
    "where both rows were scored on the same items and their records say which items each got right (McNemar's "
    "setting): 100 std(d)/sqrt(n), d per item the share of the method's seeds right minus the baseline's; otherwise "
    "unpaired, sqrt(SE_method^2 + SE_baseline^2). The check passes when the gap exceeds the stated multiple of its SE; "
    "the baseline is the best reference row on that task."
)


def suite_tasks(suite: Suite) -> list[tuple[str, str]]:
    return suite.task_table()


def scored(records: list[dict[str, Any]], suite: Suite) -> list[dict[str, Any]]:
    """The records with one more per eval, harmonic-mean and ``also_as`` column of the suite's tasks
    (:func:`board.with_columns`)."""
    if not isinstance(suite.tasks, dict):
        return records
    harmonic = {name: task.harmonic for name, task in suite.tasks.items()}
    return board.with_columns(records, harmonic, {name: list(task.also_as) for name, task in suite.tasks.items()})


def checks(records: list[dict[str, Any]], suite: Suite) -> dict[str, list[dict[str, Any]]]:
    """The suite's check (its method against the best baseline per task) for each protocol with final results."""
    if suite.check is None:
        return {}
    out = {}
    records = scored(records, suite)
    for protocol in PROTOCOLS:
        found = board.cells([r for r in records if r["protocol"] == protocol], protocol)
        if found:
            table = board.rows(found, suite_tasks(suite), suite.means)
            out[protocol] = board.check(table, suite_tasks(suite), suite.check.method, suite.check.sigmas)
    return out


def check_summary(checked: dict[str, list[dict[str, Any]]]) -> str:
    """One line per protocol and task for a terminal: ``standard wordnet16: lora 73.8 vs linear 68.0, +5.8 = 4.1 SE,
    pass``."""
    lines = []
    for protocol, entries in checked.items():
        for c in entries:
            head = f"check {protocol} {c['task']}: {c['method']}"
            if c["passed"] is None:
                lines.append(f"{head}: {'no result' if c['cell'] is None else 'no baseline result'}")
                continue
            ratio = "no test size" if c["ratio"] is None else f"{c['ratio']:.1f} {'paired ' * c['paired']}SE"
            result = f"{'PASS' if c['passed'] else 'FAIL'} (> {c['sigmas']:g} SE)"
            lines.append(f"{head} {c['cell'].mean:.2f} vs {c['baseline']} {c['base_cell'].mean:.2f}: "
                         f"{c['gap']:+.2f} = {ratio}, {result}")  # fmt: skip
    return "\n".join(lines)


def _tradeoffs(suite: Suite) -> list[tuple[str, str]]:
    """``(task, eval)`` of each harmonic-mean column: the two scores a trade-off plot sets against each other."""
    if not isinstance(suite.tasks, dict):
        return []
    return [(name, of) for name, task in suite.tasks.items() for of in task.harmonic.values()]


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _cost(records: list[dict[str, Any]]) -> str:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            by_method[r["method"]].append(r)
    head = ["method", "runs", "wall s (all runs)", "wall s per final run (mean)", "CPU s per final run (mean)",
            "train items/s (mean)", "peak memory MB (max)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def mean_of(values: list[float]) -> str:
        return f"{statistics.fmean(values):.0f}" if values else ""

    for method, mine in sorted(by_method.items(), key=lambda kv: -sum(r["wall_seconds"] for r in kv[1])):
        wall = sum(r["wall_seconds"] for r in mine)
        final = [r for r in mine if r["phase"] == "final"]
        per_final = mean_of([r["wall_seconds"] for r in final])
        cpu = mean_of([r["cpu_seconds"] for r in final if r.get("cpu_seconds") is not None])
        speed = statistics.fmean(r["images_per_second"] for r in mine)
        peak = max(r["peak_memory_mb"] for r in mine)
        lines.append(f"| `{method}` | {len(mine)} | {wall:.0f} | {per_final} | {cpu} | {speed:.0f} | {peak:.0f} |")
    total = sum(r["wall_seconds"] for rs in by_method.values() for r in rs)
    return "\n".join(lines) + f"\n\nTotal wall time of the recorded runs: {total:.0f} s ({total / 60:.1f} min).\n"


def _failures(records: list[dict[str, Any]]) -> str:
    failed = [r for r in records if r["status"] == "failed"]
    if not failed:
        return ""
    lines = ["## Failed runs", "", "| protocol | task | method | phase | seed | error (last line) |"]
    lines.append("|" + " --- |" * 6)
    for r in failed:
        last = ((r.get("error") or "").strip().splitlines() or [""])[-1][:160]
        cols = [r["protocol"], r["task"], f"`{r['method']}`", r["phase"], r["seed"], last]
        lines.append("| " + " | ".join(map(str, cols)) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(records: list[dict[str, Any]], suite: Suite, out: Path, command: str = "") -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard_<protocol>[_<metric>].csv``, the PNGs and ``runs.jsonl`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = suite_tasks(suite)
    known = {t for t, _ in tasks}
    others = sorted({(r["task"], r["group"]) for r in records if r["task"] not in known})
    written = []
    regenerate = f"Regenerate: `{command}`" if command else ""
    parts = [f"# {suite.name} leaderboard", "", regenerate, "", suite.caption or MEANS, ""]
    checked = checks(records, suite)
    columns = scored(records, suite)
    by_protocol = {}  # protocol -> leaderboard rows, for the published table
    for protocol in PROTOCOLS:
        mine = [r for r in columns if r["protocol"] == protocol]
        if not any(r["phase"] == "final" and r["status"] == "ok" for r in mine):
            continue
        spec = suite.protocol(protocol)
        for best_epoch in REPORTED[protocol]:
            metric = suite.metric() + (BEST_EPOCH if best_epoch else "")
            caption = f"Protocol **{label(protocol, best_epoch, spec)}**."
            for table_tasks, title in ((tasks, suite.name), (others, "other tasks")):
                if not table_tasks:
                    continue
                table = board.rows(board.cells(mine, protocol, best_epoch), table_tasks, suite.means)
                if not table:
                    continue
                heading = f"{title}: {protocol}, {metric}"
                parts.append(board.markdown(table, table_tasks, heading, caption, suite.means))
                if table_tasks is tasks and not best_epoch:
                    by_protocol[protocol] = table
                if table_tasks is tasks:
                    stem = f"{protocol}_{metric}"
                    csv_path = out / f"leaderboard_{stem}.csv"
                    _write(csv_path, board.to_csv(table, tasks, protocol, metric))
                    written.append(csv_path)
                    plot_title = f"{suite.name}, {label(protocol, best_epoch, spec)}"
                    axis = suite.metric_label()
                    made_plots = [
                        plots.accuracy_vs_params(table, out / f"accuracy_vs_params_{stem}.png", plot_title, axis),
                        plots.heatmap(table, tasks, out / f"heatmap_{stem}.png", plot_title, axis),
                    ]
                    for x, y in _tradeoffs(suite):
                        made_plots.append(plots.tradeoff(table, x, y, out / f"{x}_vs_{y}_{stem}.png", plot_title))
                    for made in made_plots:
                        if made:
                            written.append(made)
                            parts.append(f"![{made.stem}]({made.name})\n")
        if protocol in checked:
            sigmas = suite.check.sigmas
            parts += [f"### Check ({protocol}): `{suite.check.method}` beats the best baseline by more than {sigmas:g} "
                      "standard errors", "", CHECK, "", board.check_markdown(checked[protocol])]  # fmt: skip
    published = PUBLISHED / f"{suite.tasks}.csv" if isinstance(suite.tasks, str) else None
    if published is not None and published.is_file():
        ours = board.rows(board.cells(records, "literature", best_epoch=True), tasks)
        note = (
            "## Published numbers (ViT-B/16 ImageNet-21k)\n\nEach row was produced under its paper's own protocol, "
            "mostly the best epoch on the test set; compare them with our `literature` best-epoch numbers, never "
            "with `standard`. Differences under about 0.5 points are protocol noise."
        )
        parts.append(board.published_markdown(board.read_published(published, tasks), ours, tasks, note))
    if suite.published is not None:
        path = PUBLISHED / suite.published.file
        parts.append(board.published_rows_markdown(path, by_protocol, [t for t, _ in tasks], suite.published.note))
    parts += ["## Cost", "", _cost(records), _failures(records)]
    md = out / "leaderboard.md"
    _write(md, "\n".join(parts))
    runs = out / "runs.jsonl"
    slim = [{**{k: v for k, v in r.items() if k != "run_dir"}, "config": _data_only(r.get("config"))} for r in records]
    text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in slim)
    _write(runs, text.replace(f"{ROOT}/", ""))  # paths inside the repository, relative to its root
    return [md, runs, *written]


def _data_only(config: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"data": config["data"]} if config and "data" in config else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
