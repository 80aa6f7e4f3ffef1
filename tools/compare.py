"""Print finished runs side by side: method, trainable parameters, test accuracy, wall time.

python tools/compare.py runs/quickstart/lora runs/quickstart/linear
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpeft.engine import cli
from vpeft.errors import MissingFileError


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
    print(f"{'run':<28} {'method':<12} {'trainable':>10} {'+head':>10} {'test top-1':>11} {'wall s':>8}")
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            print(f"{str(run):<28} no summary.json (the run did not finish)")
            continue
        s = json.loads(path.read_text())
        print(
            f"{str(run):<28} {s['method']:<12} {s['trainable_params']:>10,} {s['trainable_params_with_head']:>10,} "
            f"{s['test']['top1']:>10.2f}% {s['wall_seconds']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
