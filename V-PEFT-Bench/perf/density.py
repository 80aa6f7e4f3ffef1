"""MLP activation density of trained runs (DEFT's measure): the share of MLP activations above a threshold.

    python V-PEFT-Bench/perf/density.py RUN_DIR [RUN_DIR ...] [--split test] [--thresholds 0 0.01 0.1] [--base]

For each run directory (tools/train.py's), the run's adapter is loaded (``vpeft.engine.run_dir.open_run``) and the
split is run in evaluation mode; a forward pre-hook on each block's MLP down projection (role ``mlp_out``, the
modules ``density_loss`` taps) counts the entries of its input, the MLP's intermediate activation, with
``|a| > threshold``, over the tokens that are not padding (the batch's ``attention_mask``). ``--base`` adds the same
count with the adapter disabled (the pre-trained model). Prints one markdown row per run: the run, its test
accuracy (from ``summary.json``), the densities, and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import vpeft
from vpeft.engine import cli
from vpeft.engine.run_dir import open_run
from vpeft.plugins.density_loss import ActivationTap, mlp_activation_modules


def count(run, split: str, thresholds: list[float], batch_size: int) -> list[float]:
    """The density at each threshold over ``split``'s non-padding tokens."""
    dataset = run.datasets[split]
    tap = ActivationTap(mlp_activation_modules(run.model, ("mlp_out",), None))
    above = torch.zeros(len(thresholds), dtype=torch.float64)
    total = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = run.task.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            tap.recording = True
            with torch.no_grad():
                run.task.logits(run.model, batch)
            tap.recording = False
            keep = batch["attention_mask"].bool()
            for a in tap.take():
                tokens = a[keep].abs()  # (non-padding tokens, neurons)
                total += tokens.numel()
                above += torch.tensor([float((tokens > t).sum()) for t in thresholds], dtype=torch.float64)
    finally:
        tap.close()
    return (above / max(total, 1)).tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of text_classification runs")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--base", action="store_true", help="also the pre-trained model (adapter disabled)")
    args = parser.parse_args(argv)
    heads = " | ".join(f"density abs(a)>{t:g}" for t in args.thresholds)
    print(f"| run | plug-ins | test accuracy | {heads} | seconds |")
    print("|---|---|---|" + "---|" * len(args.thresholds) + "---|")
    for run_dir in args.runs:
        tic = time.perf_counter()
        run = open_run(run_dir)
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        plugins = ", ".join(summary.get("plugins") or []) or "-"
        accuracy = f"{summary['test']['accuracy']:.2f}"
        rows = [(Path(run_dir).name, plugins, accuracy, count(run, args.split, args.thresholds, args.batch))]
        if args.base:
            with vpeft.disabled(run.model):
                dens = count(run, args.split, args.thresholds, args.batch)
            rows.append((f"{Path(run_dir).name} (adapter disabled)", "-", "-", dens))
        for name, plugs, acc, dens in rows:
            cells = " | ".join(f"{100 * d:.2f}%" for d in dens)
            print(f"| {name} | {plugs} | {acc} | {cells} | {time.perf_counter() - tic:.0f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
