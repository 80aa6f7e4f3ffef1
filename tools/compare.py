"""Print finished runs side by side: task, method, trainable parameters, the task's headline test metric, wall time.

python tools/compare.py runs/quickstart/lora runs/quickstart/linear

The headline metric is the one the run's task names (``summary.json`` key ``metric``): classification ``top1``,
segmentation ``mIoU``, detection ``map`` (percent), medical segmentation ``dice`` (0 to 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vpeft.engine import cli
from vpeft.errors import MissingFileError


def headline(summary: dict[str, Any]) -> tuple[str, float]:
    """The run's headline metric and its test value (summaries from before tasks, all classification, lack
    ``metric``)."""
    metric = summary.get("metric", "top1")
    return metric, summary["test"][metric]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    strangers = [str(run) for run in args.runs if not (run / "config.yaml").is_file()]
    if strangers:
        raise MissingFileError(
            f"{len(strangers)} of the paths are not run directories (no config.yaml): {', '.join(strangers)}. "
            "Give the --work-dir of runs made by tools/train.py."
        )
    print(f"{'run':<28} {'task':<20} {'method':<12} {'trainable':>10} {'+head':>10} {'test metric':>16} {'wall s':>8}")
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            print(f"{str(run):<28} no summary.json (the run did not finish)")
            continue
        s = json.loads(path.read_text())
        metric, value = headline(s)
        print(
            f"{str(run):<28} {s.get('task', 'classification'):<20} {s['method']:<12} {s['trainable_params']:>10,} "
            f"{s['trainable_params_with_head']:>10,} {f'{metric} {value:.4g}':>16} {s['wall_seconds']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
