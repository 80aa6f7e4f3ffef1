"""Train a PEFT method from a YAML run config.

    python tools/train.py configs/quickstart.yaml
    python tools/train.py CONFIG --set optim.lr=5e-4 method.r=16 --work-dir runs/x
    python tools/train.py CONFIG --resume runs/x          # continue where it stopped

The run directory (default ``work_dirs/<config name>``) gets config.yaml, metrics.jsonl, tensorboard/, checkpoint.pt,
adapter/ and summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=5e-4")
    parser.add_argument("--work-dir", help="run directory (default work_dirs/<config name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="with --resume: accept a config that differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.set)
    run_dir = Path(args.resume or args.work_dir or Path("work_dirs") / Path(args.config).stem)
    summary = train(cfg, run_dir, resume=args.resume is not None, force=args.force)
    print(
        json.dumps(
            {"run_dir": str(run_dir), "test": summary["test"], "trainable_params": summary["trainable_params"]},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
