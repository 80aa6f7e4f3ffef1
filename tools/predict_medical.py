"""Segment new images with a trained run: its preprocessing re-applied, predictions saved as NIfTI on each image's grid.

    python tools/predict_medical.py RUN_DIR IMAGE [IMAGE ...] --out DIR

The run directory holds what the adapter was trained with: ``config.yaml`` (model, head, data options) and
``adapter/`` (with ``preprocessing.json``, the record a copied adapter keeps). The intensity rule, orientation and
spacing are rebuilt from them, so a new image gets exactly the normalisation the adapter was trained on; each
prediction is resampled back to its image's grid and saved with its affine and header (``<name>_pred.nii.gz``).
The run directory is only read, never written: it may be read-only or shared. An image the medical data check
refuses (NaN voxels, another number of axes, unreadable) stops the command with every problem listed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from vpeft.engine import cli
from vpeft.engine.run_dir import open_run
from vpeft.errors import ConfigError
from vpeft.medical.inference import save_prediction
from vpeft.medical.preprocess import Preprocessing
from vpeft.medical.volumes import load_volumes


def predict(run_dir: str | os.PathLike, images: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Predict each image file with the run's adapter; returns the written prediction files."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = open_run(run_dir, data=False, task="medical_segmentation")
    task, model = run.task, run.model
    stored = run_dir / "adapter" / "preprocessing.json"
    prep = Preprocessing.load(stored.parent) if stored.is_file() else task.preprocessing
    if prep != task.preprocessing:
        raise ConfigError(f"{stored} differs from the run's config.yaml data options; which one was trained on?")
    model.eval()
    volumes = load_volumes([{"image": str(p)} for p in images], prep, len(task.classes), task.data.channels)
    written = []
    for volume in volumes:
        with torch.no_grad():
            logits = task.predict(model, torch.as_tensor(volume.image), None, torch.Generator())
        name = Path(volume.source).name.split(".")[0]
        written.append(save_prediction(logits.argmax(0), volume, out_dir / f"{name}_pred.nii.gz"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in predict(args.run_dir, args.images, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
