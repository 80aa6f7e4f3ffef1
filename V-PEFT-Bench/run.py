"""Run a benchmark suite: tasks x methods x seeds under a named protocol, then write the leaderboard.

    python V-PEFT-Bench/run.py --suite vtab1k --methods lora,ssf,spt_lora --seeds 3
    python V-PEFT-Bench/run.py --suite fgvc --methods lora --seeds 3 --data-root data/fgvc
    python V-PEFT-Bench/run.py --suite minivtab --methods all --seeds 3          # offline, builds its data
    python V-PEFT-Bench/run.py --suite lm --methods lora,bitfit --seeds 3          # text tasks, with their baselines
    python V-PEFT-Bench/run.py --suite clip_scenes --methods lora_both,comp_lora_both,coop --seeds 3 \
        --protocol quick                          # CLIP base-to-novel and k-shot (variants: the suite's names)
    python V-PEFT-Bench/run.py --suite vtab1k --tasks cifar100,dtd --methods lora:r=16 --protocol literature
    python V-PEFT-Bench/run.py --data-root ~/my_tasks --tasks xray --methods lora --out runs/xray \\
        --set train.epochs=5 model.pretrained=checkpoints/vit.safetensors

Suites live in ``configs/bench/<suite>.yaml`` (tasks, recipes, seeds, grid, baselines). ``--tasks`` takes names or
aliases, or folders under ``--data-root`` in the same layout that the tables do not know (class count from their
lists). A suite's baselines (the linear probe, in-context prompting) run with every sweep, each on its own tasks,
unless ``--no-baselines``; finished ones are skipped like every run.
``--set`` overrides recipe keys as in ``tools/train.py``; a grid key set there is taken out of the grid.
Every run writes ``<out>/<protocol>/<task>/<method>/<phase>/<tag>/result.json``; finished runs are skipped, a
failed run is recorded and the sweep goes on (exit status 1 at the end). The leaderboard goes to
``<out>/leaderboard`` unless ``--leaderboard DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from vbench.board import score  # noqa: E402
from vbench.protocol import (  # noqa: E402
    PROTOCOLS,
    baselines,
    final_runs,
    label,
    parse_method,
    parse_seeds,
    select,
    tune_runs,
)
from vbench.report import check_summary, checks, write_leaderboard  # noqa: E402
from vbench.runner import collect, execute  # noqa: E402
from vbench.suite import load_suite, resolve_tasks  # noqa: E402

import vpeft  # noqa: E402
from vpeft.engine import cli  # noqa: E402
from vpeft.engine.config import ConfigError, load_config  # noqa: E402
from vpeft.errors import UnknownNameError  # noqa: E402
from vpeft.methods import METHODS, TEXT_TOWER_METHODS  # noqa: E402
from vpeft.registry import lookup  # noqa: E402


def _say(record: dict, ran: bool) -> None:
    what = f"{record['protocol']} {record['task']} {record['method']} {record['phase']} seed={record['seed']}"
    point = " ".join(f"{k.split('.')[-1]}={v}" for k, v in record["hparams"].items())
    if record["status"] != "ok":
        print(f"FAILED  {what} {point}: {record['error'].strip().splitlines()[-1]}", flush=True)
        return
    best_score = score(record, best_epoch=True)
    best = f", best epoch on test {best_score:.2f}" if best_score is not None else ""
    done = f"{record['wall_seconds']:.0f} s" if ran else "done before, skipped"
    metric = record.get("metric", "top1")
    print(f"{what} {point}: {record['eval_split']} {metric} {score(record):.2f} (last epoch{best}; {done})", flush=True)


def build_data(suite, data_root: Path, tasks) -> None:
    """Build a generated suite's data (MiniVTAB) when task folders are missing."""
    missing = [t.name for t in tasks if t.root is not None and not t.root.is_dir()]
    if not suite.build or not missing:
        return
    spec = importlib.util.spec_from_file_location("suite_builder", ROOT / suite.build)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(data_root, missing)


def run_unit(args, suite, task, method, seeds, out: Path) -> int:
    """One method on one task under the chosen protocol; returns the number of failed runs."""
    failed, point = 0, ()
    seeds = seeds[: method.seeds]

    def run_or_list(run, listed: str = "") -> dict | None:
        """Execute ``run`` and report it (None with --dry-run, which only lists it)."""
        nonlocal failed
        if args.dry_run:
            print(f"  {run.rel_dir}{listed}")
            return None
        record, ran = execute(run, task.recipe, out, args.keep_checkpoints)
        _say(record, ran)
        failed += record["status"] != "ok"
        return record

    plan = tune_runs(suite, task, method, seeds[0], args.set, args.protocol)
    if plan:
        scored = [(run.point, score(run_or_list(run) or {})) for run in plan]
        if not args.dry_run:
            point = select(scored)
            if point is None:
                print(f"SKIPPED {task.name} {method.label}: every grid point failed, no final runs", flush=True)
                return failed
    for run in final_runs(suite, args.protocol, task, method, seeds, point, args.set):
        run_or_list(run, " (with the selected grid point)" if plan else "")
    return failed


def check_method(suite, protocol: str, task, method, seeds, user_set) -> None:
    """Load the run config of ``method``'s first final run on ``task``, as :func:`execute` will: unknown names and
    options, with close matches, are an error here instead of one failed run per task and seed."""
    try:
        lookup(METHODS, method.name, "method")
    except UnknownNameError as err:
        if not suite.variants:
            raise
        raise UnknownNameError(f"{err} Suite {suite.name!r} also names {', '.join(suite.variants)}.") from None
    run = final_runs(suite, protocol, task, method, seeds[:1], (), user_set)[0]
    try:
        load_config(task.recipe, list(run.overrides))
    except ConfigError as err:
        raise ConfigError(f"--methods {method.label} on task {task.name}: {err}") from None


def _spawn_shards(argv: list[str], jobs: int) -> int:
    """Run ``jobs`` copies of this command, each on every ``jobs``-th (method, task) with one thread; 0 if all ok."""
    base = [sys.executable, str(Path(__file__).resolve()), *argv, "--threads", "1", "--no-leaderboard"]
    procs = [subprocess.Popen([*base, "--shard", f"{i}/{jobs}"]) for i in range(jobs)]
    return max(p.wait() for p in procs)


def _strip_jobs(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--jobs":
            skip = True
        elif not item.startswith("--jobs="):
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="vtab1k", help="vtab1k | fgvc | minivtab | lm | clip_scenes | a yaml")
    parser.add_argument("--tasks", help="comma-separated task names/aliases or folders under --data-root")
    parser.add_argument("--data-root", type=Path, help="folder with one sub-folder per task (default: the suite's)")
    parser.add_argument("--methods", default="lora", help="comma-separated (`name:key=value` for options), all, none")
    parser.add_argument("--seeds", default="3", help="a count (first N of the suite's seeds) or a list: 42,44")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="standard")
    parser.add_argument("--out", type=Path, help="results folder (default work_dirs/bench/<suite>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    parser.add_argument("--no-baselines", action="store_true", help="leave out the suite's baseline rows")
    parser.add_argument("--leaderboard", type=Path, help="where the leaderboard goes (default <out>/leaderboard)")
    parser.add_argument("--no-leaderboard", action="store_true", help="do not write the leaderboard")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt")
    parser.add_argument("--jobs", type=int, default=1, help="processes in parallel, one thread each (CPU sweeps)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th (method, task) from the i-th")
    parser.add_argument("--threads", type=int, help="torch threads of this process (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    suite = load_suite(args.suite)
    spec = suite.protocol(args.protocol)
    data_root = args.data_root or suite.default_root()
    data_root = data_root.expanduser().resolve() if data_root is not None else None
    tasks = resolve_tasks(suite, args.tasks.split(",") if args.tasks else None, data_root)
    # "all": the methods an image encoder takes; `frozen` (trains nothing) runs only as a suite's declared baseline
    every = [m for m in vpeft.list_methods() if m not in TEXT_TOWER_METHODS and m != "frozen"]
    named = {"all": every, "none": []}
    names = named[args.methods] if args.methods in named else args.methods.split(",")
    methods = [parse_method(m, suite) for m in names] + ([] if args.no_baselines else baselines(suite))
    seeds = parse_seeds(args.seeds, suite)
    index, count = (int(x) for x in args.shard.split("/"))
    out = (args.out or ROOT / "work_dirs" / "bench" / suite.name).resolve()
    units = [(method, task) for method in methods for task in tasks if method.applies_to(task)]
    first = {}
    for method, task in units:  # a wrong name or option stops before any run (and before --dry-run lists them)
        if method.label not in first:
            first[method.label] = task
            check_method(suite, args.protocol, task, method, seeds, args.set)
    if args.shard == "0/1":  # the parent of --jobs shards prints the plan once
        shown = ", ".join(dict.fromkeys(m.label for m, _ in units))  # baselines only where they apply
        print(f"suite {suite.name}: {len(tasks)} tasks x methods {shown} x seeds {seeds}; {args.protocol}")
        fixed = [item.split("=", 1)[0] for item in args.set]
        print(f"  ({label(args.protocol, False, spec, fixed)}); results in {out}", flush=True)
    if not args.dry_run:
        build_data(suite, data_root, tasks)

    if args.jobs > 1 and not args.dry_run:
        failed = _spawn_shards(_strip_jobs(argv), args.jobs)
    else:
        failed = sum(run_unit(args, suite, task, method, seeds, out) for method, task in units[index::count])
    if args.dry_run or args.no_leaderboard:
        return 1 if failed else 0
    board = (args.leaderboard or out / "leaderboard").resolve()
    here = board.relative_to(ROOT) if board.is_relative_to(ROOT) else board
    command = "python V-PEFT-Bench/leaderboard.py " + shlex.join(
        ["--suite", args.suite, "--results", f"{here}/runs.jsonl", "--out", str(here)]
    )
    command += "`; runs: `python V-PEFT-Bench/run.py " + shlex.join(argv)
    records = collect(out)
    written = write_leaderboard(records, suite, board, command)
    print(f"leaderboard: {written[0]}")
    verdicts = check_summary(checks(records, suite))
    if verdicts:
        print(verdicts)
    if failed:
        print("some runs failed; rerun the same command to retry them (finished runs are skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
