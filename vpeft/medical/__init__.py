"""Medical image segmentation with MONAI: data (datalists, checks, preprocessing, slices and patches), metrics,
inference and the offline synthetic datasets. The task that trains with them is ``vpeft.tasks.medical``."""

from .inference import save_prediction, to_source_grid
from .metrics import CaseMetrics
from .preprocess import CT_WINDOWS, Preprocessing
from .slices import CaseDataset, PatchDataset, SliceDataset, predict_patches, predict_slices
from .synthetic import write_synthetic
from .volumes import Volume, load_volumes, read_datalist

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
