"""The offline CLIP proof: base-to-novel on the scenes with the tiny pretrained CLIP, every method x seed.

    nice -n 5 python V-PEFT-Bench/clip_base_to_novel.py --out work_dirs/clip_b2n \\
        --results V-PEFT-Bench/results/clip_scenes

Protocol (CoCoOp's base-to-novel, Zhou et al., CVPR 2022, Sec. 4.1, on our data): each method trains on 16 shots of
each of the 12 base classes (``configs/clip/<method>.yaml``; ``train.seed`` and the shots' ``data.options.seed`` are
the seed), is scored on the base classes' test split (the run's own test metric) and then, the same adapter with the
text head rebuilt for other class names, on the 12 novel classes and on the 6 pairs no pretraining caption named
(``held_out``, a subset of novel). ``HM`` is the harmonic mean of base and novel. The zero-shot row is the
pretrained model without an adapter (no training, so one value for every seed). Zero-shot retention is novel
accuracy after training minus zero-shot novel accuracy; base gain is base accuracy after minus zero-shot base.

Writes ``runs.jsonl`` (one row per run), ``base_to_novel.md`` (means and sample standard deviations over the
seeds, with the command) and ``base_to_novel.png`` (novel change against base gain). A finished run is not rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vpeft.data import build_loader
from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.run_dir import open_run
from vpeft.engine.train import build_run, train
from vpeft.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "V-PEFT-Bench/published/clip_base_to_novel.csv"
METHODS = ("lora_both", "lora_image", "comp_lora_both", "coop")
CLASS_SETS = ("base", "novel", "held_out")


def scores(run_dir: Path | None, overrides: list[str]) -> dict[str, float]:
    """Test top-1 on each class set: of the adapter in ``run_dir``, or of the pretrained model when it is None."""
    out = {}
    for classes in CLASS_SETS:
        chosen = [f"data.options.classes={classes}"]
        if run_dir is None:
            task, model, datasets = build_run(load_config(ROOT / "configs/clip/_scenes_b2n.yaml", overrides + chosen))
        else:
            run = open_run(run_dir, chosen)
            task, model, datasets = run.task, run.model, run.datasets
        loader = build_loader(datasets["test"], 256, train=False, num_workers=0)
        out[classes] = task.evaluate(model, loader, torch.device("cpu"))["top1"]
    return out


def harmonic(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel else 0.0


def run_all(out: Path, methods: list[str], seeds: list[int], overrides: list[str]) -> list[dict[str, Any]]:
    rows = []
    zero_path = out / "zero_shot.json"
    if not zero_path.is_file():
        zero = scores(None, overrides)
        _write(zero_path, json.dumps(zero) + "\n")
    zero = json.loads(zero_path.read_text())
    rows.append({"method": "zero_shot", "seed": None, **zero, "trainable_params": 0, "wall_seconds": 0.0})
    for method in methods:
        for seed in seeds:
            run_dir = out / method / f"seed{seed}"
            result = run_dir / "base_to_novel.json"
            if not result.is_file():
                tic = time.perf_counter()
                sets = [*overrides, f"train.seed={seed}", f"data.options.seed={seed}"]
                cfg = load_config(ROOT / f"configs/clip/{method}.yaml", sets)
                summary = train(cfg, run_dir / "run", resume=(run_dir / "run" / "config.yaml").is_file())
                row = {"method": method, "seed": seed, **scores(run_dir / "run", [])}
                row |= {"trainable_params": summary["trainable_params"], "wall_seconds": time.perf_counter() - tic}
                row["base_run"] = summary["test"]["top1"]  # the run's own test metric: equals row["base"]
                _write(result, json.dumps(row) + "\n")
            rows.append(json.loads(result.read_text()))
    return rows


def table(rows: list[dict[str, Any]], command: str) -> str:
    zero = next(r for r in rows if r["method"] == "zero_shot")
    lines = [
        "# Base-to-novel on the offline scenes (tiny CLIP pretrained here)",
        "",
        f"`{command}`",
        "",
        "Top-1 (%) on the test split, mean ± sample std over seeds; chance: base and novel 8.3, held-out 16.7.",
        "Base gain and novel change are against zero-shot (novel change is the zero-shot retention).",
        "",
        "| method | seeds | trainable | base | novel | HM | held-out pairs | base gain | novel change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in ["zero_shot", *dict.fromkeys(r["method"] for r in rows if r["method"] != "zero_shot")]:
        mine = [r for r in rows if r["method"] == method]
        cell = lambda values: _mean_std(values)  # noqa: E731
        base, novel = [r["base"] for r in mine], [r["novel"] for r in mine]
        hm = [harmonic(b, n) for b, n in zip(base, novel, strict=True)]
        lines.append(
            f"| {method} | {len([r for r in mine if r['seed'] is not None]) or '-'} | {mine[0]['trainable_params']:,} "
            f"| {cell(base)} | {cell(novel)} | {cell(hm)} | {cell([r['held_out'] for r in mine])} "
            f"| {cell([b - zero['base'] for b in base])} | {cell([n - zero['novel'] for n in novel])} |"
        )
    lines += [
        "",
        "Published base-to-novel numbers on real data (CoOp's 11 datasets, CLIP ViT-B/16; not comparable with the",
        "scenes above, which check the protocol and the trade-off offline):",
        "",
        "| method | base | novel | HM | source |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    with PUBLISHED.open(newline="") as handle:
        for row in csv.DictReader(handle):
            lines.append(f"| {row['method']} | {row['base']} | {row['novel']} | {row['hm']} | {row['source']} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = next(r for r in rows if r["method"] == "zero_shot")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "zero_shot"):
        mine = [r for r in rows if r["method"] == method]
        x = [r["base"] - zero["base"] for r in mine]
        y = [r["novel"] - zero["novel"] for r in mine]
        ax.scatter(x, y, alpha=0.35)
        ax.errorbar(statistics.mean(x), statistics.mean(y), xerr=statistics.pstdev(x), yerr=statistics.pstdev(y),
                    fmt="o", capsize=3, label=method, color=ax.collections[-1].get_facecolor()[0][:3])  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("base-class gain over zero-shot (top-1 points)")
    ax.set_ylabel("novel-class change vs zero-shot (points)")
    ax.set_title("Offline scenes, tiny CLIP: novel retained vs base gained")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work_dirs/clip_b2n"), help="run directories")
    parser.add_argument("--results", type=Path, help="where the table, plot and runs.jsonl go")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"configs/clip/<name>.yaml, from {METHODS}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a shared machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    rows = run_all(args.out, methods, [int(s) for s in args.seeds.split(",")], args.set)
    if args.results:
        command = "python V-PEFT-Bench/clip_base_to_novel.py " + " ".join(argv if argv is not None else sys.argv[1:])
        _write(args.results / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        _write(args.results / "base_to_novel.md", table(rows, command))
        plot(rows, args.results / "base_to_novel.png")
        print(table(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
