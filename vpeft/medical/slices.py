"""2D training on slices of 3D volumes, 3D training on patches, and whole-case inference for both.

* :class:`SliceDataset`: the slices of preprocessed volumes along one ``axis`` as 2D items (user-needs MO4: a
  dataset, not a preprocessing script). ``foreground_ratio`` keeps every slice holding a label and draws background
  slices (seeded) so that they make ``1 - foreground_ratio`` of the items; ``context`` k adds the k neighbouring slices
  on each side as channels (2.5D: (2k + 1) * C channels, clamped at the ends). Each slice is resized to ``size`` and
  augmented with albumentations, image and mask in one call so they stay aligned. A 2-D case is one slice.
* :class:`PatchDataset`: random 3D patches, centred on foreground or background voxels by MONAI's
  ``RandCropByPosNegLabeld`` (pos:neg ratio), padded first where the volume is smaller than the patch.
* :class:`CaseDataset`: whole cases for evaluation; :func:`predict_slices` runs a 2D model slice by slice and stacks
  the slice logits back into a volume (so the metrics are 3D, with the volume's spacing), and
  :func:`predict_patches` runs a 3D model with MONAI's ``sliding_window_inference``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .volumes import Volume

AUGMENTS = ("none", "light")


def augmentation(name: str, size: tuple[int, int], seed: int | None = None) -> A.Compose:
    """Resize to ``size`` then the named augmentation; no flips by default (left and right organs are classes).
    ``seed`` fixes albumentations' own generator (it draws from neither numpy's nor torch's)."""
    if name not in AUGMENTS:
        raise ConfigError(f"data.options.augment must be one of {AUGMENTS}, got {name!r}.")
    steps: list[Any] = [A.Resize(*size)]
    if name == "light":
        steps += [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.7),
            A.RandomBrightnessContrast(0.1, 0.1, p=0.5),
        ]
    return A.Compose(steps, seed=seed)


def slice_of(array: np.ndarray, axis: int, index: int, context: int = 0) -> np.ndarray:
    """Slice ``index`` of a (C, X, Y, Z) array along spatial ``axis`` with ``context`` neighbours each side as
    channels: (C * (2 context + 1), a, b). A (C, X, Y) array is its own single slice."""
    if array.ndim == 3:
        return np.asarray(array)
    depth = array.shape[axis + 1]
    picks = np.clip(np.arange(index - context, index + context + 1), 0, depth - 1)
    parts = [np.take(array, int(i), axis=axis + 1) for i in picks]  # each (C, a, b)
    return np.concatenate(parts, axis=0)


class SliceDataset(Dataset):
    """2D training items ``{"image": (C', H, W) float32, "label": (H, W) int64}`` from ``volumes``."""

    def __init__(
        self,
        volumes: Sequence[Volume],
        size: tuple[int, int],
        axis: int = 2,
        context: int = 0,
        foreground_ratio: float | None = None,
        augment: str = "none",
        seed: int = 0,
    ):
        if not 0 <= axis <= 2:
            raise ConfigError(f"data.options.axis must be 0, 1 or 2 (a spatial axis), got {axis}.")
        if foreground_ratio is not None and not 0.0 < foreground_ratio <= 1.0:
            raise ConfigError(f"data.options.foreground_ratio must be in (0, 1] or null, got {foreground_ratio}.")
        self.volumes, self.axis, self.context = list(volumes), axis, context
        self.transform = augmentation(augment, size, seed)  # in the main process (num_workers 0): from train.seed
        self.index = self._choose(foreground_ratio, np.random.default_rng(seed))

    def reseed(self, seed: int) -> None:
        """Called in each loader worker with its own seed (:func:`vpeft.data.loader.seed_worker`)."""
        self.transform.set_random_seed(seed)

    def _choose(self, ratio: float | None, rng: np.random.Generator) -> list[tuple[int, int]]:
        fg, bg = [], []
        for v, volume in enumerate(self.volumes):
            if volume.label is None:
                raise DataError(f"case {volume.name} has no label; training needs labelled cases.")
            if volume.spatial_dims == 2:
                (fg if volume.label.any() else bg).append((v, 0))
                continue
            others = tuple(a for a in range(3) if a != self.axis)
            holds = np.asarray(volume.label[0] > 0).any(axis=others)  # (depth,): does slice s hold a label
            for s, has in enumerate(holds):
                (fg if has else bg).append((v, s))
        if ratio is None or not fg:
            return sorted(fg + bg)
        wanted = min(len(bg), round(len(fg) * (1.0 - ratio) / ratio))
        picked = [bg[i] for i in rng.choice(len(bg), size=wanted, replace=False)] if wanted else []
        return sorted(fg + picked)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        v, s = self.index[i]
        volume = self.volumes[v]
        image = slice_of(volume.image, self.axis, s, self.context)  # (C', a, b)
        label = slice_of(volume.label, self.axis, s)[0]  # (a, b)
        out = self.transform(image=np.moveaxis(image, 0, -1).astype(np.float32), mask=label.astype(np.int64))
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(out["image"], -1, 0)))
        return {"image": image.reshape(-1, *image.shape[-2:]), "label": torch.from_numpy(out["mask"]).long()}


class PatchDataset(Dataset):
    """3D training items ``{"image": (C, *patch), "label": (*patch)}``, ``samples`` per volume per epoch."""

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch: Sequence[int],
        samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        seed: int = 0,
    ):
        if len(patch) != 3:
            raise ConfigError(f"data.options.patch must hold 3 sizes for 3D training, got {list(patch)}.")
        self.volumes, self.samples = list(volumes), samples
        keys = ("image", "label")
        self.crop = mt.Compose(
            [
                mt.SpatialPadd(keys, spatial_size=patch),
                mt.RandCropByPosNegLabeld(keys, "label", spatial_size=patch, pos=pos, neg=neg, num_samples=1),
            ]
        )
        self.crop.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        volume = self.volumes[i % len(self.volumes)]
        item = {"image": torch.as_tensor(np.asarray(volume.image)), "label": torch.as_tensor(np.asarray(volume.label))}
        out = self.crop(item)[0]
        return {"image": torch.as_tensor(out["image"]).float(), "label": torch.as_tensor(out["label"])[0].long()}


class CaseDataset(Dataset):
    """Whole cases (:class:`Volume`) for evaluation; batches are lists (cases differ in shape)."""

    def __init__(self, volumes: Sequence[Volume]):
        self.volumes = list(volumes)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> Volume:
        return self.volumes[i]


Predict = Callable[[Tensor, Tensor | None], Tensor]  # (B, C, H, W) images, (B, H, W) labels or None -> logits


@torch.no_grad()
def predict_slices(
    predict: Predict,
    image: Tensor,
    size: tuple[int, int],
    axis: int = 2,
    context: int = 0,
    batch: int = 16,
    label: Tensor | None = None,
) -> Tensor:
    """Logits (K, *spatial) of a (C, X, Y[, Z]) case from a 2D model run on its slices, stacked back along ``axis``.

    ``label`` (1, *spatial), when given, is sliced and resized alongside (nearest) for models that take prompts.
    """
    if image.dim() == 3:  # a 2-D case: one slice
        return _predict_2d(predict, image[None], size, None if label is None else label[None])[0]
    array = image.cpu().numpy()
    labels = None if label is None else label.cpu().numpy()
    depth = image.shape[axis + 1]
    outs = []
    for start in range(0, depth, batch):
        picks = range(start, min(depth, start + batch))
        chunk = torch.stack([torch.from_numpy(slice_of(array, axis, s, context)) for s in picks]).to(image.device)
        ys = None if labels is None else torch.stack([torch.from_numpy(slice_of(labels, axis, s)) for s in picks])
        outs.append(_predict_2d(predict, chunk, size, ys))  # (b, K, a, c)
    return torch.cat(outs).movedim(0, axis + 1)  # (K, *spatial): the slice index goes back to its axis


def _predict_2d(predict: Predict, images: Tensor, size: tuple[int, int], labels: Tensor | None) -> Tensor:
    """(b, C, a, c) images and (b, 1, a, c) labels -> (b, K, a, c) logits, the model run at ``size``."""
    shape = images.shape[-2:]
    if labels is not None:
        labels = F.interpolate(labels.float().to(images.device), size=size, mode="nearest")[:, 0].long()
    logits = predict(F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False), labels)
    return F.interpolate(logits.float(), size=shape, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_patches(
    predict: Callable[[Tensor], Tensor], image: Tensor, patch: Sequence[int], overlap: float = 0.25, batch: int = 2
) -> Tensor:
    """Logits (K, X, Y, Z) of a (C, X, Y, Z) case from a 3D model, patch by patch (Gaussian-free constant blending)."""
    return sliding_window_inference(image[None].float(), list(patch), batch, predict, overlap=overlap)[0]
