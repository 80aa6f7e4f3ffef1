"""Rebuild a leaderboard from result files: a results folder (every ``result.json`` below it) or a ``runs.jsonl``.

    python V-PEFT-Bench/leaderboard.py --suite vtab1k --results work_dirs/bench/vtab1k
    python V-PEFT-Bench/leaderboard.py --suite lm --results V-PEFT-Bench/results/lm/runs.jsonl
    python V-PEFT-Bench/leaderboard.py --suite minivtab --results V-PEFT-Bench/results/minivtab/runs.jsonl \\
        --out V-PEFT-Bench/results/minivtab

Writes ``leaderboard.md``, ``leaderboard_<protocol>_<metric>.csv``, ``accuracy_vs_params_*.png``, ``heatmap_*.png``
and ``runs.jsonl`` (default: ``<results>/leaderboard``, or the folder of the ``runs.jsonl``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from vbench.report import check_summary, checks, read_jsonl, write_leaderboard  # noqa: E402
from vbench.runner import check_result, collect  # noqa: E402
from vbench.suite import load_suite  # noqa: E402

from vpeft.engine import cli  # noqa: E402
from vpeft.errors import MissingFileError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="vtab1k")
    parser.add_argument("--results", type=Path, required=True, help="a results folder or a runs.jsonl")
    parser.add_argument("--out", type=Path, help="leaderboard folder")
    args = parser.parse_args(argv)
    suite = load_suite(args.suite)
    if not args.results.exists():
        raise MissingFileError(f"--results {args.results} does not exist; give a results folder or a runs.jsonl.")
    if args.results.is_file():
        records = read_jsonl(args.results)
        bad = [(i, p) for i, r in enumerate(records, 1) if (p := check_result(r))]
        if bad:
            parser.error(f"{args.results} line {bad[0][0]}: {'; '.join(bad[0][1])}")
        out = args.out or args.results.parent
    else:
        records = collect(args.results)
        out = args.out or args.results / "leaderboard"
    command = "python V-PEFT-Bench/leaderboard.py " + shlex.join(
        ["--suite", args.suite, "--results", str(out / "runs.jsonl"), "--out", str(out)]
    )  # runs.jsonl, written below, is all it needs
    written = write_leaderboard(records, suite, out, command)
    print("\n".join(str(p) for p in written))
    verdicts = check_summary(checks(records, suite))
    if verdicts:
        print(verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
