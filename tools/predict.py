"""Classify images with a trained classification run: top-k class names with probabilities.

    python tools/predict.py RUN_DIR IMAGE [IMAGE ...] [--topk 5] [--json]

The run directory gives everything: ``config.yaml`` (model, data options), ``adapter/`` and ``classes.json`` (the
class names of the training set). Each image is read as RGB and goes through the run's evaluation transform (resize,
crop and normalisation of its backbone), exactly as the test split was. Nothing is written into the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from vpeft.data.common import load_rgb
from vpeft.engine import cli
from vpeft.engine.distributed import setup
from vpeft.engine.run_dir import class_names, open_run
from vpeft.errors import MissingFileError


def predict(run_dir: str | os.PathLike, images: list[str], topk: int = 5) -> list[dict[str, Any]]:
    """For each image: ``{"image": path, "top": [{"class": name, "index": i, "probability": p}, ...]}``, most
    probable first."""
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise MissingFileError(f"image file(s) not found: {', '.join(missing)}.")
    run = open_run(run_dir, task="classification")
    names = class_names(run_dir, run)
    transform = run.datasets["test"].transform
    device = setup(run.cfg.train.device).device
    model = run.model.to(device)
    results = []
    for path in images:
        with torch.no_grad():  # load_rgb names a file that is no image
            probs = model(transform(load_rgb(path))[None].to(device)).float().softmax(-1)[0].cpu()
        top = probs.topk(min(topk, probs.numel()))
        results.append({
            "image": str(path),
            "top": [
                {"class": names[i] if i < len(names) else f"class {i}", "index": i, "probability": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
        })  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be at least 1, got {args.topk}")
    results = predict(args.run_dir, args.images, args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for entry in result["top"]:
            print(f"  {100 * entry['probability']:6.2f}%  {entry['class']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
