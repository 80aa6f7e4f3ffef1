"""Decathlon datalists in, checked and preprocessed volumes out, with an optional on-disk cache.

A datalist is the Medical Segmentation Decathlon's ``dataset.json`` (MONAI's convention, read with
``monai.data.load_decathlon_datalist``): lists of ``{"image": path, "label": path}`` under split keys (``training``,
``validation``, ``test``...), paths relative to the dataset root, and optionally ``"labels": {"0": "background",
"1": "liver"}``. ``image`` may also be a DICOM series folder or a list of files (one per channel).

Before anything trains, :func:`load_volumes` checks every entry and raises one error listing every problem found
(user-needs M1/MO3: a missing file is reported with all the others, not one per run): files that do not exist, files
no reader can open (named), images whose number of axes is not what the config says (a 4-D file where 3-D volumes are
expected), images with NaN or infinite voxels, image and label of different shapes or spacings/affines, label values
outside the class list (listed with :func:`vpeft.data.check.listing`, as the image-folder check lists). An empty
label volume is a warning, not an error (its Dice is undefined and the metrics skip it, see ``metrics.py``).

Each checked entry becomes a :class:`Volume`: the image (C, *spatial) float32 after :class:`Preprocessing`, the label
(1, *spatial) int16, the affine and spacing after preprocessing (the metrics' spacing) and the file's own affine,
shape and path (to write predictions back onto the file's grid). With ``cache_dir`` the arrays are saved as ``.npy``
(read back memory-mapped, never unpickled) under a key of the source files' paths, sizes and modification times and
the preprocessing spec, so a changed file or spec is preprocessed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist

from ..data.check import listing
from ..errors import DataError, MissingFileError, UnknownNameError
from ..files import atomic_write
from .preprocess import Preprocessing

log = logging.getLogger("vpeft")
CACHE_VERSION = 1


@dataclass
class Volume:
    """One preprocessed case. Spatial axes follow MONAI: (C, X, Y[, Z])."""

    name: str
    image: np.ndarray  # (C, *spatial) float32 in [0, 1] (after the modality's intensity rule)
    label: np.ndarray | None  # (1, *spatial) int16 class ids, None for unlabelled test cases
    affine: np.ndarray  # (4, 4) after orientation and spacing
    spacing: tuple[float, ...]  # voxel size in mm after preprocessing: the metrics' spacing
    source: str  # the image file (or folder) it came from
    source_affine: np.ndarray  # (4, 4) of the file
    source_shape: tuple[int, ...]  # spatial shape of the file

    @property
    def spatial_dims(self) -> int:
        return self.image.ndim - 1


def read_datalist(path: str | os.PathLike, split: str, root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Entries of ``split`` of a Decathlon datalist, paths made absolute against ``root`` (default: its folder)."""
    path = Path(path)
    data = _read_json(path)
    if split not in data:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        raise UnknownNameError(
            f"datalist {path} has no split {split!r}; its lists are {lists}. Set data.train_split etc."
        )
    base = Path(root) if root is not None else path.parent
    return load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base)


def datalist_classes(path: str | os.PathLike) -> list[str] | None:
    """Class names from the datalist's ``labels`` map (index order), if it has one."""
    labels = _read_json(Path(path)).get("labels")
    if not isinstance(labels, dict):
        return None
    return [labels[k] for k in sorted(labels, key=int)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"datalist {path} does not exist (data.options.datalist, relative to data.root).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist {path} is not valid JSON ({err}); is it truncated?") from None
    if not isinstance(data, dict):
        raise DataError(f"datalist {path} holds a {type(data).__name__}; a Decathlon datalist is a JSON object.")
    return data


def missing_files(entries: list[dict[str, Any]]) -> list[str]:
    """Every image and label path of ``entries`` that does not exist, in order."""
    out = []
    for entry in entries:
        for key in ("image", "label"):
            value = entry.get(key)
            for p in value if isinstance(value, list | tuple) else [value] if value is not None else []:
                if not Path(p).exists():
                    out.append(f"{key} {p}")
    return out


def load_volumes(
    entries: list[dict[str, Any]],
    prep: Preprocessing,
    num_classes: int,
    channels: int = 1,
    cache_dir: str | os.PathLike | None = None,
    what: str = "datalist",
) -> list[Volume]:
    """Check every entry of ``entries`` (see the module docstring), then preprocess (or read from the cache) each."""
    missing = missing_files(entries)
    if missing:
        raise MissingFileError(listing(f"{what}: {len(missing)} files do not exist", missing))
    problems: list[str] = []
    volumes = []
    for entry in entries:
        try:
            volumes.append(_volume(entry, prep, num_classes, channels, cache_dir))
        except _BadCase as err:
            problems.extend(err.args[0])
    if problems:
        raise DataError(listing(f"{what}: {len(problems)} problems in the data", problems))
    return volumes


class _BadCase(Exception):
    """The problems of one entry (a list of messages)."""


def _volume(
    entry: dict[str, Any], prep: Preprocessing, num_classes: int, channels: int, cache_dir: str | os.PathLike | None
) -> Volume:
    with_label = entry.get("label") is not None
    key = _cache_key(entry, prep) if cache_dir is not None else None
    if key is not None:
        cached = _read_cache(Path(cache_dir), key)
        if cached is not None:
            return cached
    raw = _load(entry, prep, with_label)
    _check(entry, raw, prep, num_classes, channels)
    out = prep.resample(with_label)(raw)
    image = out["image"]
    label = out["label"] if with_label else None
    name = Path(_first(entry["image"])).name.split(".")[0]
    volume = Volume(
        name=name,
        image=np.ascontiguousarray(image.numpy(), dtype=np.float32),
        label=None if label is None else np.rint(label.numpy()).astype(np.int16),
        affine=np.asarray(image.affine, dtype=np.float64),
        spacing=tuple(float(s) for s in image.pixdim),
        source=str(_first(entry["image"])),
        source_affine=np.asarray(raw["image"].affine, dtype=np.float64),
        source_shape=tuple(int(s) for s in raw["image"].shape[1:]),
    )
    if key is not None:
        _write_cache(Path(cache_dir), key, volume)
    return volume


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) else value


def _load(entry: dict[str, Any], prep: Preprocessing, with_label: bool) -> dict[str, Any]:
    """The raw MetaTensors; a file no reader opens is named in the error."""
    out = {}
    for key in ("image", "label") if with_label else ("image",):
        try:
            out[key] = prep.loader(with_label=False)({"image": entry[key]})["image"]
        except Exception as err:  # noqa: BLE001 - MONAI wraps reader errors in several types
            cause = err.__cause__ or err
            raise _BadCase(
                [f"{key} {entry[key]}: cannot be read ({type(cause).__name__}: {str(cause)[:200]})"]
            ) from None
    return out


def _check(entry: dict[str, Any], raw: dict[str, Any], prep: Preprocessing, num_classes: int, channels: int) -> None:
    problems = []
    image, label = raw["image"], raw.get("label")
    source = entry["image"]
    dims = image.ndim - 1
    if dims != prep.spatial_dims or image.shape[0] != channels:
        shape = tuple(image.shape[1:]) + ((image.shape[0],) if image.shape[0] > 1 else ())
        problems.append(
            f"image {source}: shape {shape} is {dims}-D with {image.shape[0]} channel(s); the config expects "
            f"{prep.spatial_dims}-D with {channels} channel(s) (data.options.spatial_dims / data.options.channels; "
            "a 4-D file holds a channel or time axis last)"
        )
    pixels = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    if pixels.is_floating_point() and not torch.isfinite(pixels).all():
        bad = int((~torch.isfinite(pixels)).sum())
        problems.append(
            f"image {source}: {bad} of {pixels.numel()} voxels are NaN or infinite; fill them (e.g. with the "
            "background intensity) before training or predicting"
        )
    if label is not None:
        if label.shape[0] != 1:
            problems.append(f"label {entry['label']}: has {label.shape[0]} channels; a label map has one")
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            problems.append(
                f"label {entry['label']}: shape {tuple(label.shape[1:])} differs from image {source} "
                f"{tuple(image.shape[1:])}"
            )
        elif not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3):
            problems.append(
                f"label {entry['label']}: spacing {_spacing(label)} / affine differs from image {source} "
                f"{_spacing(image)}; they must share one voxel grid"
            )
        values = torch.unique(label.as_tensor() if hasattr(label, "as_tensor") else label)
        bad = [v.item() for v in values if v != torch.round(v) or not 0 <= v < num_classes]
        if bad:
            problems.append(
                f"label {entry['label']}: values {bad[:10]} are outside the class list 0..{num_classes - 1} "
                "(data.options.classes)"
            )
        elif values.max() == 0:
            log.warning("vpeft: label %s is empty (background only); its Dice is skipped", entry["label"])
    if problems:
        raise _BadCase(problems)


def _spacing(t: Any) -> tuple[float, ...]:
    return tuple(round(float(s), 4) for s in t.pixdim)


# -- the on-disk cache -----------------------------------------------------------------------------------------
def _cache_key(entry: dict[str, Any], prep: Preprocessing) -> str:
    files = []
    for key in ("image", "label"):
        value = entry.get(key)
        for p in value if isinstance(value, list | tuple) else [value] if value is not None else []:
            stat = Path(p).stat()
            files.append([str(Path(p).resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([CACHE_VERSION, files, prep.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(cache: Path, key: str) -> Volume | None:
    meta_path = cache / f"{key}.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    label_path = cache / f"{key}.label.npy"
    return Volume(
        name=meta["name"],
        image=np.load(cache / f"{key}.image.npy", mmap_mode="r", allow_pickle=False),
        label=np.load(label_path, mmap_mode="r", allow_pickle=False) if meta["has_label"] else None,
        affine=np.asarray(meta["affine"]),
        spacing=tuple(meta["spacing"]),
        source=meta["source"],
        source_affine=np.asarray(meta["source_affine"]),
        source_shape=tuple(meta["source_shape"]),
    )


def _write_cache(cache: Path, key: str, volume: Volume) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(cache / f"{key}.image.npy", lambda tmp: _save_npy(tmp, volume.image))
    if volume.label is not None:
        atomic_write(cache / f"{key}.label.npy", lambda tmp: _save_npy(tmp, volume.label))
    meta = {
        "name": volume.name,
        "has_label": volume.label is not None,
        "affine": volume.affine.tolist(),
        "spacing": list(volume.spacing),
        "source": volume.source,
        "source_affine": volume.source_affine.tolist(),
        "source_shape": list(volume.source_shape),
    }
    # the json last: an entry with a json has its arrays
    atomic_write(cache / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta) + "\n"))


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, array, allow_pickle=False)
