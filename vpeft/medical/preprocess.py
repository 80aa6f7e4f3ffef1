"""What is done to a medical image before the network sees it, as one serialisable spec, and MONAI's transforms for it.

:class:`Preprocessing` is the whole deterministic path from a file to network-ready intensities:

    LoadImaged (NIfTI, DICOM series folder, PNG...) -> EnsureChannelFirstd -> Orientationd(axcodes)
    -> Spacingd(pixdim; bilinear image, nearest label) -> intensity (per modality) -> [0, 1]

Intensity per modality (MedSAM #101: CT scaled min-max without a HU window trains badly):

* ``CT``: clip to a HU window and scale to [0, 1] (``ScaleIntensityRanged``). ``window`` is ``[low, high]`` in HU or a
  preset name from :data:`CT_WINDOWS` (window width / level as radiology defines them: low = L - W/2, high = L + W/2).
* ``MR``: clip each channel to its own ``percentiles`` (default 0.5 and 99.5) and scale to [0, 1]
  (``ScaleIntensityRangePercentilesd``, channel-wise): MR intensities have no absolute unit.
* ``RGB``: 8-bit photographs (endoscopy, dermoscopy): divide by 255.
* ``none``: min-max per image.

The spec is stored with a run (``preprocessing.json``, :meth:`Preprocessing.save`) and rebuilt from it at inference,
so a saved adapter never meets intensities other than those it was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from monai import transforms as mt

from ..errors import ConfigError, MissingFileError
from ..files import atomic_write

# window presets as (width, level) in HU; the usual radiology reading windows
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "soft_tissue": (350.0, 50.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
    "mediastinum": (350.0, 50.0),
}
MODALITIES = ("CT", "MR", "RGB", "none")
FILE = "preprocessing.json"


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic preprocessing of one dataset (see the module docstring).

    Attributes:
        modality: ``CT``, ``MR``, ``RGB`` or ``none`` (picks the intensity rule).
        window: CT only: ``[low, high]`` HU or a :data:`CT_WINDOWS` name.
        percentiles: MR only: lower and upper percentiles clipped per channel.
        spacing: voxel size to resample to (mm, one value per spatial axis), or ``None`` to keep the file's.
        orientation: axis codes (``RAS``) to reorient to, or ``None`` to keep the file's.
        spatial_dims: 3 for volumes, 2 for images; a file with another number of spatial axes is refused.
    """

    modality: Literal["CT", "MR", "RGB", "none"] = "none"
    window: tuple[float, float] | str | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    spatial_dims: int = 3

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"data.options.modality must be one of {MODALITIES}, got {self.modality!r}.")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        if self.modality == "CT":
            self.hu_range()  # validates the window
        elif self.window is not None:
            raise ConfigError(f"data.options.window is a CT setting; modality is {self.modality!r}.")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"data.options.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}.")
        if self.spacing is not None and (len(self.spacing) != self.spatial_dims or min(self.spacing) <= 0):
            raise ConfigError(
                f"data.options.spacing must hold {self.spatial_dims} positive sizes in mm, got {self.spacing}."
            )
        if self.orientation is not None and len(self.orientation) != self.spatial_dims:
            raise ConfigError(
                f"data.options.orientation must have {self.spatial_dims} axis codes, got {self.orientation!r}."
            )

    def hu_range(self) -> tuple[float, float]:
        """The CT window as (low, high) HU."""
        window = self.window
        if window is None:
            raise ConfigError(
                f"modality CT needs data.options.window: [low, high] HU or one of {sorted(CT_WINDOWS)} "
                "(e.g. abdomen = W400 L40 = [-160, 240])."
            )
        if isinstance(window, str):
            if window not in CT_WINDOWS:
                raise ConfigError(f"unknown CT window {window!r}; presets: {sorted(CT_WINDOWS)}, or give [low, high].")
            width, level = CT_WINDOWS[window]
            return level - width / 2, level + width / 2
        low, high = (float(v) for v in window)
        if not low < high:
            raise ConfigError(f"data.options.window must be [low, high] with low < high, got {list(window)}.")
        return low, high

    # -- MONAI transforms ---------------------------------------------------------------------------------------
    def intensity(self, keys: tuple[str, ...] = ("image",)) -> mt.MapTransform:
        """The modality's intensity rule, mapping to [0, 1]."""
        if self.modality == "CT":
            low, high = self.hu_range()
            return mt.ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        if self.modality == "MR":
            lo, hi = self.percentiles
            return mt.ScaleIntensityRangePercentilesd(keys, lo, hi, 0.0, 1.0, clip=True, channel_wise=True)
        if self.modality == "RGB":
            return mt.ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
        return mt.ScaleIntensityd(keys, minv=0.0, maxv=1.0)

    def loader(self, with_label: bool = True) -> mt.Compose:
        """Read the files as they are: channel-first MetaTensors with the file's affine (what the data check sees)."""
        keys = ("image", "label") if with_label else ("image",)
        return mt.Compose([mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys)])

    def resample(self, with_label: bool = True) -> mt.Compose:
        """Reorient, resample and scale the loaded image (and label): deterministic, so the result may be cached."""
        keys = ("image", "label") if with_label else ("image",)
        steps: list[Any] = []
        if self.orientation:
            steps.append(mt.Orientationd(keys, axcodes=self.orientation, labels=None))
        if self.spacing:
            modes = ("bilinear", "nearest") if with_label else ("bilinear",)
            steps.append(mt.Spacingd(keys, pixdim=self.spacing, mode=modes))
        steps += [self.intensity(), mt.EnsureTyped(keys, dtype=np.float32, track_meta=True)]
        return mt.Compose(steps)

    def transforms(self, with_label: bool = True) -> mt.Compose:
        """The whole path from file names to network-ready intensities."""
        return mt.Compose([self.loader(with_label), self.resample(with_label)])

    # -- storage ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        data = dict(data)
        for key in ("percentiles", "spacing"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        if isinstance(data.get("window"), list):
            data["window"] = tuple(float(v) for v in data["window"])
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Preprocessing:
        path = Path(directory) / FILE
        if not path.is_file():
            raise MissingFileError(f"{path} does not exist: the run did not store its preprocessing.")
        return cls.from_dict(json.loads(path.read_text()))
