"""Datasets, transforms and loaders for fine-tuning vision backbones.

Every dataset returns ``(image_tensor, int_label)`` after its transform and has ``num_classes`` and ``classes``.
``DATASETS`` is a plain dict from a name to a constructor ``(root, split, transform, **options) -> Dataset``; add
your own with ``DATASETS["mine"] = MyDataset``.

=================  =====================================================================================
name               layout (see each module's docstring)
=================  =====================================================================================
``folder``         ``<root>/<split>/<class_name>/*.{jpg,jpeg,png,bmp,webp}``; label map from ``train``
``list``           NOAH VTAB-1k: ``<root>/<split>.txt`` lines ``<relative path> <label>``
``fashion_mnist``  IDX ``.gz`` files in ``/usr/share/datasets/fashion-mnist`` (``dataset-fashion-mnist``)
``digits``         scikit-learn's ``load_digits`` (no files); seeded stratified train/val/test split
``vtab``           a VTAB-1k task folder (NOAH layout: ``train800``/``val200``/``train800val200``/``test`` lists)
``fgvc``           an FGVC dataset in VPT's json splits; the label map is built once from ``train``
``scenes``         drawn shapes named by colour and shape (no files); few-shot and base/novel class sets
=================  =====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from vpeft.data.common import ImageDataset, balanced_subset, check_root
from vpeft.data.digits import Digits
from vpeft.data.fashion_mnist import FashionMNIST, read_idx
from vpeft.data.fgvc import FGVCDataset
from vpeft.data.folder import FolderDataset, ListDataset
from vpeft.data.loader import EpochSampler, build_loader, seed_worker, set_epoch
from vpeft.data.scenes import SceneDataset
from vpeft.data.transforms import AUGMENT_POLICIES, build_transform
from vpeft.data.vtab import VtabDataset
from vpeft.registry import lookup

DATASETS: dict[str, Callable[..., Dataset]] = {
    "folder": FolderDataset,
    "list": ListDataset,
    "fashion_mnist": FashionMNIST,
    "digits": Digits,
    "vtab": VtabDataset,
    "fgvc": FGVCDataset,
    "scenes": SceneDataset,
}


def build_dataset(
    name: str, root: str | Path | None, split: str, transform: Callable | None = None, **options
) -> Dataset:
    """Build a registered dataset.

    Args:
        name: A key of ``DATASETS``; an unknown name raises a ``KeyError`` listing close matches.
        root: Dataset root (``None`` for ``digits``, or for ``fashion_mnist``'s default location).
        split: Split name (e.g. ``"train"``, ``"val"``, ``"test"``; for ``list``, a list file name).
        transform: Applied to each RGB ``PIL.Image``; see :func:`build_transform`.
        **options: Dataset-specific options (``classes_from``, ``train_list``, ``val_size``, ``subset``, ``seed``).

    Returns:
        The dataset; items are ``(image_tensor, int_label)``.
    """
    return lookup(DATASETS, name, "dataset")(root, split, transform, **options)


__all__ = [
    "AUGMENT_POLICIES",
    "DATASETS",
    "Digits",
    "EpochSampler",
    "FashionMNIST",
    "FGVCDataset",
    "FolderDataset",
    "ImageDataset",
    "ListDataset",
    "VtabDataset",
    "balanced_subset",
    "build_dataset",
    "build_loader",
    "build_transform",
    "check_root",
    "read_idx",
    "seed_worker",
    "set_epoch",
]
