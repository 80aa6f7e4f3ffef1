"""Predictions written back as NIfTI on the input file's own grid, with its affine and header.

The network sees a case after orientation and resampling (:class:`~vpeft.medical.preprocess.Preprocessing`); a
prediction on that grid is resampled back (nearest neighbour, MONAI's ``ResampleToMatch``) to the file's shape and
affine, and saved with the file's header (dtype and scaling reset for a label map), so it opens aligned with the
image in a viewer (MONAI #2090). Written atomically, ``.nii`` or ``.nii.gz`` by the name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch
from torch import Tensor

from ..errors import ConfigError
from ..files import atomic_write
from .volumes import Volume


def to_source_grid(pred: Tensor, volume: Volume) -> np.ndarray:
    """Class ids (*spatial) on the preprocessed grid -> class ids on the source file's grid (its shape)."""
    same = tuple(pred.shape) == volume.source_shape and np.allclose(volume.affine, volume.source_affine, atol=1e-4)
    if same:
        return pred.cpu().numpy()
    moving = MetaTensor(pred[None].float().cpu(), affine=torch.as_tensor(volume.affine))
    target = MetaTensor(torch.zeros(1, *volume.source_shape), affine=torch.as_tensor(volume.source_affine))
    out = ResampleToMatch(mode="nearest", padding_mode="zeros")(moving, img_dst=target)
    return np.rint(out[0].numpy())


def save_prediction(pred: Tensor, volume: Volume, path: str | os.PathLike) -> Path:
    """Save class ids ``pred`` (*spatial, on the preprocessed grid of ``volume``) as NIfTI aligned with its source."""
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ConfigError(f"prediction file {path} must end in .nii or .nii.gz.")
    data = to_source_grid(pred, volume).astype(np.uint8 if pred.max() < 256 else np.int16)
    header = None
    if volume.source.endswith((".nii", ".nii.gz")):
        header = nib.load(volume.source).header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)  # a label map is stored as is, whatever scaling the image had
    image = nib.Nifti1Image(data, volume.source_affine, header)
    blob = image.to_bytes()
    if path.name.endswith(".gz"):
        blob = gzip.compress(blob, mtime=0)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
    return path
