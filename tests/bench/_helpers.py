"""Fake VTAB-1k and FGVC folders written by the tests, and imports of the bench scripts (V-PEFT-Bench, datasets)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "V-PEFT-Bench"  # on sys.path through tests/bench/conftest.py


def load_script(relative: str):
    """Import a script of the repository (``datasets/vtab1k.py``, ``V-PEFT-Bench/run.py``) as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image(value: int, size: int = 8) -> Image.Image:
    """A flat RGB image whose pixels all equal ``value`` (the label can be read back from the pixels)."""
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def fake_vtab(folder: Path, labels: Mapping[str, Sequence[int]]) -> Path:
    """A NOAH-layout task: ``images/<split>/<i>.png`` whose grey level is ``10 * label``, and ``<split>.txt``."""
    for split, values in labels.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, label in enumerate(values):
            image(10 * label).save(folder / "images" / split / f"{i:06d}.png")
            lines.append(f"images/{split}/{i:06d}.png {label}\n")
        (folder / f"{split}.txt").write_text("".join(lines))
    return folder


def fake_fgvc(folder: Path, splits: Mapping[str, Mapping[str, str | int]], image_dir: str = "images") -> Path:
    """A VPT-layout dataset: ``<split>.json`` {path: class id} and a small image per path under ``image_dir``."""
    for split, entries in splits.items():
        for rel in entries:
            path = folder / image_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            image(7).save(path)
        (folder / f"{split}.json").write_text(json.dumps(dict(entries)))
    return folder
