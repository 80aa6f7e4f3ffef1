"""Compress a finished run's adapter with ComPEFT (vpeft.compress) and measure file size and accuracy.

python tools/compeft.py runs/x --out runs/x_compeft --density 0.1 --alphas 0.5 1 2 4 --select-split val

The run's initial adapter is rebuilt from its config (the backbone and the method seeded as training seeded them),
the task vector ``trained - initial`` is compressed at each alpha, and each decompressed adapter is scored on
``--select-split``; the best alpha (the paper picks alpha on validation data) is kept in ``OUT/compeft`` (the
artefact) and ``OUT/run`` (a run directory with the decompressed adapter, for tools/test.py), and scored on the test
split beside the original adapter. ``OUT/compeft_report.json`` holds the sizes, ratio, accuracies and command.
A method that initialises from data (calibration batches) cannot be rebuilt without them and is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import vpeft
from vpeft.compress import compress, decompress, load_compressed, save_compressed, stored_bytes
from vpeft.core import WEIGHTS_FILE, adapter_tensors, read_adapter
from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.run_dir import evaluate_run
from vpeft.engine.train import build_run
from vpeft.errors import ConfigError, ExistingPathError
from vpeft.files import atomic_write
from vpeft.methods import METHODS


def initial_adapter(run_dir: Path) -> dict:
    """The adapter tensors of ``run_dir``'s method at initialisation, rebuilt as training built them."""
    cfg = load_config(run_dir / "config.yaml")
    if METHODS[cfg.method.name].needs_calibration:
        raise ConfigError(
            f"{run_dir}: method {cfg.method.name!r} initialises from calibration data, so its initial "
            "adapter cannot be rebuilt from the seed alone; ComPEFT needs the initial adapter."
        )
    task, model, _ = build_run(cfg)
    vpeft.apply_method(model, cfg.method.name, **task.method_options(cfg.method.options))
    return {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}


def write_run(run_dir: Path, out: Path, tensors: dict) -> None:
    """A run directory ``out`` with ``run_dir``'s config and classes and an adapter holding ``tensors``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "classes.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    src = run_dir / "adapter"
    (out / "adapter").mkdir(exist_ok=True)
    shutil.copyfile(src / "adapter_config.json", out / "adapter" / "adapter_config.json")
    from safetensors.torch import save_file

    flat = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out / "adapter" / WEIGHTS_FILE, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--density", type=float, default=0.1, help="share of the update's entries kept (top-k)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0], help="scales tried, in units of sigma(tau)")
    parser.add_argument("--scope", choices=("global", "tensor"), default="global")
    parser.add_argument(
        "--exact", nargs="*", default=[], metavar="NAME",
        help="adapter tensors stored as they are, not ternary (e.g. head: a task head trained from scratch)",
    )  # fmt: skip
    parser.add_argument("--select-split", default="val", help="split that picks alpha")
    parser.add_argument("--test-split", default="test")
    parser.add_argument(
        "--original-from-summary",
        action="store_true",
        help="take the original adapter's test metrics from the run's summary.json instead of scoring it again",
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        raise ExistingPathError(f"--out {args.out} exists; choose a new directory.")
    meta, trained = read_adapter(args.run_dir / "adapter")
    init = initial_adapter(args.run_dir)
    scores = {}
    for alpha in args.alphas:
        comp = compress(trained, init, args.density, alpha, args.scope, args.exact)
        write_run(args.run_dir, args.out / f"alpha={alpha:g}", decompress(comp, init))
        if len(args.alphas) > 1:  # one alpha: nothing to select
            scores[alpha] = evaluate_run(args.out / f"alpha={alpha:g}", args.select_split)
            print(json.dumps({"alpha": alpha, args.select_split: _short(scores[alpha])}), flush=True)
    best = max(args.alphas, key=lambda a: _main_metric(scores[a])) if scores else args.alphas[0]
    comp = compress(trained, init, args.density, best, args.scope, args.exact)
    comp.meta = {"run_dir": str(args.run_dir), "method": meta["method"], "num_parameters": meta.get("num_parameters")}
    save_compressed(comp, args.out / "compeft")
    restored = decompress(load_compressed(args.out / "compeft"), init)  # from the files, as a receiver would
    shutil.move(str(args.out / f"alpha={best:g}"), str(args.out / "run"))
    write_run(args.run_dir, args.out / "run", restored)
    for alpha in args.alphas:
        if alpha != best:
            shutil.rmtree(args.out / f"alpha={alpha:g}")
    compressed = evaluate_run(args.out / "run", args.test_split)
    if args.original_from_summary:
        summary = json.loads((args.run_dir / "summary.json").read_text())
        original = {"split": args.test_split, "test_size": summary["test_size"], **summary["test"]}
    else:
        original = evaluate_run(args.run_dir, args.test_split)
    metric = "accuracy" if "accuracy" in compressed else next(k for k in compressed if k not in ("split", "test_size"))
    report = {
        "run_dir": str(args.run_dir),
        "command": "python tools/compeft.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "density": args.density,
        "scope": args.scope,
        "exact": args.exact,
        "alpha": best,
        "select": {f"{a:g}": _short(s) for a, s in scores.items()},
        "bytes_original": stored_bytes(args.run_dir / "adapter"),
        "bytes_compressed": stored_bytes(args.out / "compeft"),
        "test_original": _short(original),
        "test_compressed": _short(compressed),
    }
    report["ratio"] = report["bytes_original"] / report["bytes_compressed"]
    report["delta_" + metric] = compressed[metric] - original[metric]
    atomic_write(
        args.out / "compeft_report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    )
    print(json.dumps(report, indent=2))
    return 0


def _main_metric(metrics: dict) -> float:
    return (
        metrics["accuracy"]
        if "accuracy" in metrics
        else next(v for k, v in metrics.items() if k not in ("split", "test_size"))
    )


def _short(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "test_hits"}


if __name__ == "__main__":
    sys.exit(cli.run(main))
