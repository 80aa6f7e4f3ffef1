"""Evaluate a finished run's adapter on its test split and write ``test_metrics.json`` into the run directory.

python tools/test.py runs/x [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import vpeft
from vpeft.files import atomic_write
from vpeft.data import build_loader
from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.distributed import setup
from vpeft.engine.train import CONFIG, build_run
from vpeft.errors import MissingFileError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split)")
    args = parser.parse_args(argv)
    if not (args.run_dir / CONFIG).is_file():
        raise MissingFileError(f"{args.run_dir / CONFIG} does not exist: {args.run_dir} is not a run directory.")
    cfg = load_config(args.run_dir / CONFIG, [f"data.test_split={args.split}"] if args.split else [])
    task, model, datasets = build_run(cfg)
    vpeft.load_adapter(model, args.run_dir / "adapter")
    device = setup(cfg.train.device).device
    loader = build_loader(
        datasets["test"],
        cfg.data.eval_batch_size or cfg.data.batch_size,
        train=False,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        collate_fn=task.collate,
    )
    metrics = {"split": cfg.data.test_split, **task.evaluate(model.to(device), loader, device)}
    out = args.run_dir / "test_metrics.json"
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
