"""The data check that runs before the first training step: every bad item found, then one error listing them all.

A run should not stop in epoch 3 on the one truncated file of a folder, nor train on silently wrong pixels. The
classification task calls :func:`check_image_datasets` on its splits as it builds them (so ``tools/train.py`` and
``tools/test.py`` run it before any method is applied or any step is taken). It checks:

- labels: every label of every split lies in ``0..num_classes-1`` (the label lists only; no image is read);
- files (datasets with ``samples``, a list of ``(path, label)``: ``folder``, ``list``, ``vtab``, ``fgvc``): each opens
  (its header names a format), has a pixel mode :func:`~vpeft.data.common.load_rgb` reads (8-bit, or 16-bit scaled
  by its depth; not float, whose range and NaNs are unknown), and is whole. Whole costs little: a PNG's chunk
  checksums are read without inflating its pixels, a JPEG must end with its end-of-image marker (only one that does
  not is decoded, at 1/8 scale, to tell a trailer from a cut), any other format is decoded.

:func:`listing` formats any such list; the medical data check (:mod:`vpeft.medical.volumes`) uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import DataError
from .common import readable_mode

MAX_LISTED = 20  # items listed in one error message


def listing(header: str, items: Sequence[str]) -> str:
    """``header:`` then one item per indented line, at most :data:`MAX_LISTED` and a count of the rest."""
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{header}:\n  " + "\n  ".join(items[:MAX_LISTED]) + more


def check_image_datasets(datasets: Mapping[str, Any], num_classes: int, classes_from: str) -> None:
    """Check the labels and files of each split (``{role: dataset}``); raise one :class:`DataError` for all.

    ``classes_from`` says where ``num_classes`` came from (``model.num_classes`` or the training split), for the
    message about labels outside the range.
    """
    problems: list[str] = []
    for role, dataset in datasets.items():
        targets = list(getattr(dataset, "targets", []))
        bad = sorted({t for t in targets if not 0 <= t < num_classes})
        if bad:
            count = sum(not 0 <= t < num_classes for t in targets)
            problems.append(
                f"{role} split: {count} items have labels {bad[:10]} outside 0..{num_classes - 1} ({classes_from}); "
                "set model.num_classes to the number of classes, or leave it out to take the dataset's"
            )
        for path, _ in getattr(dataset, "samples", []):
            problem = image_file_problem(Path(path))
            if problem:
                problems.append(f"{role} split: {problem}")
    if problems:
        raise DataError(listing(f"the data has {len(problems)} problems", problems))


def _ends_with_end_marker(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        return f.read().rstrip(b"\0\r\n ").endswith(b"\xff\xd9")


def image_file_problem(path: Path) -> str | None:
    """What is wrong with the image file ``path`` (named in the text), or None if it can be read whole."""
    try:
        with Image.open(path) as image:
            if not readable_mode(image):
                return (
                    f"{path}: pixel mode {image.mode} ({image.format}) is not read; save 8-bit or 16-bit images "
                    "(PNG, JPEG)"
                )
            if image.format == "PNG":
                image.verify()
            elif image.format == "JPEG":
                if not _ends_with_end_marker(path):  # cut short, or a trailer after the image: decoding tells which
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                    image.load()
            else:
                image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{path}: cannot be read whole ({type(err).__name__}: {str(err)[:200]})"
    return None
