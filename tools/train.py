"""Train a PEFT method from a YAML run config.

    python tools/train.py configs/quickstart.yaml
    python tools/train.py CONFIG --set optim.lr=5e-4 method.r=16 --work-dir runs/x
    python tools/train.py --resume runs/x                 # continue where it stopped, with the run's own config
    python tools/train.py CONFIG --resume runs/x          # the same, checking that CONFIG still gives that config

With --resume, CONFIG is optional: the run continues with its saved config.yaml, so the first call's --set
overrides need not be repeated. A CONFIG given again is read with those overrides; a config that differs from the
run's (an edited file, or a new --set) needs --force, which then writes the new config into the run. Resuming a
finished run says so and changes nothing. The run directory (default ``work_dirs/<config name>``) gets config.yaml,
origin.json, classes.json, metrics.jsonl, tensorboard/, checkpoint.pt, adapter/ and summary.json; one log line per
epoch goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.train import resume_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML run config (optional with --resume)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=5e-4")
    parser.add_argument("--work-dir", help="run directory (default work_dirs/<config name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="with --resume: accept a config that differs")
    args = parser.parse_args(argv)
    if args.resume is None and args.config is None:
        parser.error("a CONFIG is needed to start a run (only --resume RUN_DIR can go without one)")
    if args.resume is not None and args.work_dir is not None:
        parser.error("--resume RUN_DIR is the run directory; --work-dir goes with a new run only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.resume is not None:
        run_dir = Path(args.resume)
        cfg, origin = resume_config(run_dir, args.config, args.set)
    else:
        run_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
        cfg, origin = load_config(args.config, args.set), {"config": args.config, "set": list(args.set)}
    summary = train(cfg, run_dir, resume=args.resume is not None, force=args.force, origin=origin)
    print(
        json.dumps(
            {"run_dir": str(run_dir), "test": summary["test"], "trainable_params": summary["trainable_params"]},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
