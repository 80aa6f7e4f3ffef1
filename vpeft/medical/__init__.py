"""Medical image segmentation with MONAI: data (datalists, checks, preprocessing, slices and patches), metrics,
inference and the offline synthetic datasets. The task that trains with them is ``vpeft.tasks.medical``.

The package's modules import MONAI, nibabel and albumentations directly; this file, which runs before any of them,
checks the three first, so that a missing one is named with the extra that installs it."""

from ..deps import require

require("monai", "medical", "vpeft.medical (MONAI's data path)")
require("nibabel", "medical", "vpeft.medical (NIfTI files)")
require("albumentations", "medical", "vpeft.medical (2D augmentations)")

from .inference import save_prediction, to_source_grid  # noqa: E402
from .metrics import CaseMetrics  # noqa: E402
from .preprocess import CT_WINDOWS, Preprocessing  # noqa: E402
from .slices import CaseDataset, PatchDataset, SliceDataset, predict_patches, predict_slices  # noqa: E402
from .synthetic import write_synthetic  # noqa: E402
from .volumes import Volume, load_volumes, read_datalist  # noqa: E402

__all__ = [
    "CT_WINDOWS",
    "CaseDataset",
    "CaseMetrics",
    "PatchDataset",
    "Preprocessing",
    "SliceDataset",
    "Volume",
    "load_volumes",
    "predict_patches",
    "predict_slices",
    "read_datalist",
    "save_prediction",
    "to_source_grid",
    "write_synthetic",
]
