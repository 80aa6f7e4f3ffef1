"""Score ComPEFT settings (vpeft.compress) of one trained run on a split, with the model built once: the grid that
picks density, scope and alpha before ``tools/compeft.py`` measures the chosen one on the test split.

    python V-PEFT-Bench/perf/compeft_grid.py RUN_DIR --split val --grid tensor:0.3:1,2,3 tensor:0.5:1,1.5,2

Each ``scope:density:alphas`` entry is compressed from the run's update (``trained - initial``, the initial adapter
rebuilt from the run's seed as tools/compeft.py does) and scored; one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vpeft.compress import compress, decompress
from vpeft.core import load_adapter_tensors, read_adapter
from vpeft.data import build_loader
from vpeft.engine import cli
from vpeft.engine.run_dir import open_run
from vpeft.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.compeft import initial_adapter  # noqa: E402


def parse(entry: str) -> tuple[str, float, list[float]]:
    try:
        scope, density, alphas = entry.split(":")
        return scope, float(density), [float(a) for a in alphas.split(",")]
    except ValueError:
        raise ConfigError(f"--grid entry {entry!r} is not scope:density:alpha1,alpha2 (e.g. tensor:0.3:1,2).") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--grid", nargs="+", default=["global:0.1:1,2,3", "tensor:0.3:1,2,3", "tensor:0.5:1,1.5,2"])
    parser.add_argument("--exact", nargs="*", default=[], metavar="NAME", help="tensors stored as they are (head)")
    args = parser.parse_args(argv)
    grid = [parse(e) for e in args.grid]
    init = initial_adapter(args.run_dir)
    _, trained = read_adapter(args.run_dir / "adapter")
    run = open_run(args.run_dir, [f"data.test_split={args.split}"])
    batch = run.cfg.data.eval_batch_size or run.cfg.data.batch_size
    loader = build_loader(run.datasets["test"], batch, train=False, collate_fn=run.task.collate)

    def score(tensors: dict) -> dict:
        load_adapter_tensors(run.model, "default", tensors, "compeft grid")
        return run.task.evaluate(run.model, loader, torch.device("cpu"))

    print(json.dumps({"original": score(dict(trained))}), flush=True)
    for scope, density, alphas in grid:
        for alpha in alphas:
            start = time.perf_counter()
            metrics = score(decompress(compress(trained, init, density, alpha, scope, args.exact), init))
            record = {"scope": scope, "density": density, "alpha": alpha, "exact": args.exact, args.split: metrics}
            print(json.dumps({**record, "seconds": round(time.perf_counter() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
