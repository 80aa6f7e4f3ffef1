"""Evaluate a finished run's adapter on its test split and write ``test_metrics.json`` into the run directory.

python tools/test.py runs/x [--split test]
python tools/test.py runs/clip --set data.options.classes=novel --out novel_metrics.json   # base-to-novel: novel

``--set`` edits the saved config before the model and data are built (``tools/train.py``'s syntax): the same adapter
scored on other data, such as a CLIP run trained on base classes scored on the novel ones (CoCoOp's protocol).

Where the task scores items one by one (classification, text classification, exact match) and one process runs,
the file also holds ``test_hits``: "1" or "0" per test item in the split's order, for a paired comparison of two
runs on the same items (V-PEFT-Bench's check); the terminal shows the metrics only.
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
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="edits of the saved config")
    parser.add_argument("--out", default="test_metrics.json", help="file name in the run directory")
    args = parser.parse_args(argv)
    metrics = evaluate_run(args.run_dir, args.split, args.set)
    out = args.run_dir / args.out
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    print(json.dumps({k: v for k, v in metrics.items() if k != "test_hits"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
