"""Helpers for the medical tests: small NIfTI files and datalists written into a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_datalist(root: Path, cases: dict[str, list[tuple[str, str]]], labels: dict[str, str] | None = None) -> Path:
    data = {split: [{"image": i, "label": lab} for i, lab in items] for split, items in cases.items()}
    if labels:
        data["labels"] = labels
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def blobs(shape: tuple[int, ...], seed: int = 0, classes: int = 2) -> np.ndarray:
    """A label volume with one box per class at seeded positions."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    for c in range(1, classes + 1):
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        sl = tuple(slice(a, a + max(2, s // 3)) for a, s in zip(lo, shape, strict=True))
        label[sl] = c
    return label


@pytest.fixture
def case_3d(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """One 3D case (image = 100 * label + 5) with spacing (1, 1, 2.5) and an offset origin; returns (root, label)."""
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    label = blobs((16, 16, 8))
    write_nifti(tmp_path / "img.nii.gz", (label * 100.0 + 5).astype(np.float32), affine)
    write_nifti(tmp_path / "lab.nii.gz", label, affine)
    write_datalist(tmp_path, {"training": [("img.nii.gz", "lab.nii.gz")]}, {"0": "bg", "1": "a", "2": "b"})
    return tmp_path, label
