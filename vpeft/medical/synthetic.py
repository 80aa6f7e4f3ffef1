"""The offline medical datasets: MONAI's synthetic images written as NIfTI with a Decathlon datalist.

``monai.data.create_test_image_2d`` / ``create_test_image_3d`` draw random discs (spheres) on a noisy background; the
label of an object is ``ceil(intensity * classes)``, so the classes differ in brightness and shape-free context.
:func:`write_synthetic` writes ``imagesTr/case_NNN.nii.gz`` and ``labelsTr/case_NNN.nii.gz`` (3D volumes with an
anisotropic spacing in the affine, so the metrics' spacing matters; or 2D images) and ``dataset.json`` with
``training`` / ``validation`` / ``test`` lists and the ``labels`` map, atomically. A complete copy written with the
same parameters (``manifest.json``) is left as it is.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import create_test_image_2d, create_test_image_3d

from ..files import atomic_write

MANIFEST = "manifest.json"


def write_synthetic(
    root: str | os.PathLike,
    spatial_dims: int = 2,
    counts: dict[str, int] | None = None,
    size: int = 32,
    depth: int = 16,
    classes: int = 2,
    spacing: tuple[float, ...] = (1.0, 1.0, 2.5),
    noise: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` (skipped if present with these parameters); returns the datalist path."""
    root = Path(root)
    counts = counts or {"training": 24, "validation": 6, "test": 6}
    params = {
        "spatial_dims": spatial_dims, "counts": counts, "size": size, "depth": depth, "classes": classes,
        "spacing": list(spacing[:spatial_dims]), "noise": noise, "seed": seed, "version": 1,
    }  # fmt: skip
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root / "dataset.json"
    rng = np.random.RandomState(seed)
    affine = np.diag([*spacing[:spatial_dims], *([1.0] * (3 - spatial_dims)), 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]  # an origin away from zero: a saved prediction must keep it
    datalist: dict[str, Any] = {
        "name": f"synthetic{spatial_dims}d",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", **{str(c): f"class{c}" for c in range(1, classes + 1)}},
    }
    index = 0
    for split, count in counts.items():
        datalist[split] = []
        for _ in range(count):
            if spatial_dims == 2:
                image, label = create_test_image_2d(
                    size, size, num_objs=4, rad_max=size // 5, rad_min=2, noise_max=noise,
                    num_seg_classes=classes, random_state=rng,
                )  # fmt: skip
            else:
                radius = max(3, min(size, depth) // 3 - 1)
                image, label = create_test_image_3d(
                    size, size, depth, num_objs=4, rad_max=radius, rad_min=2, noise_max=noise,
                    num_seg_classes=classes, random_state=rng,
                )  # fmt: skip
            name = f"case_{index:03d}.nii.gz"
            index += 1
            _write_nifti(root / "imagesTr" / name, (image * 1000.0).astype(np.float32), affine)
            _write_nifti(root / "labelsTr" / name, label.astype(np.uint8), affine)
            datalist[split].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    path = root / "dataset.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(datalist, indent=2) + "\n"))
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2) + "\n"))
    return path


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    blob = image.to_bytes()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(gzip.compress(blob, mtime=0)))
