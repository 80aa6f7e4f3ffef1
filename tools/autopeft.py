"""AutoPEFT (vpeft.search): a multi-objective Bayesian search of LoRA configurations (per-layer insertion, rank,
placement on attention and/or MLP) for validation score and trainable parameters; a Pareto plot.

python tools/autopeft.py configs/bench/recipes/lm_wordnet16.yaml --out runs/autopeft --trials 12 --startup 5 \\
    --set train.max_steps=40 "data.options.per_class={train: 200, val: 25, test: 250}"

Each trial trains a run in ``OUT/trial_<n>`` with its configuration's ``--set`` edits on top of the config's and
scores it on the validation split (``data.test_split=val``: the low-fidelity score that picks configurations);
``OUT/trials.jsonl``, ``OUT/pareto.json`` and ``OUT/pareto.png`` hold the results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vpeft
from vpeft.core import adapter_record
from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.train import build_run, train
from vpeft.search import block_indices, search


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="edits of the config (the budget)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--startup", type=int, default=5, help="random trials before the Gaussian process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = [*args.set, "method.name=lora", "data.test_split=val"]
    cfg = load_config(args.config, base)
    task, model, _ = build_run(cfg)  # the blocks the method can reach, by the method's own target rule
    vpeft.apply_method(model, "lora", **task.method_options({"targets": ("q", "v", "mlp_in", "mlp_out")}))
    layers = block_indices(adapter_record(model).targets)
    del model
    count = iter(range(10**9))

    def evaluate(edits: list[str]) -> tuple[float, int]:
        run = load_config(args.config, [*base, *edits])
        summary = train(run, args.out / f"trial_{next(count)}")
        return float(summary["test"][summary["metric"]]), int(summary["trainable_params"])

    search(evaluate, layers, args.trials, args.out, args.startup, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
