"""Evaluate a finished run's adapter on its test split and write ``test_metrics.json`` into the run directory.

python tools/test.py runs/x [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpeft.engine import cli
from vpeft.engine.run_dir import evaluate_run
from vpeft.files import atomic_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    args = parser.parse_args(argv)
    metrics = evaluate_run(args.run_dir, args.split)
    out = args.run_dir / "test_metrics.json"
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
