"""Image datasets read from files on disk: an ImageFolder layout and the NOAH VTAB-1k list layout.

``folder`` (:class:`FolderDataset`)::

    <root>/<split>/<class_name>/**/*.{jpg,jpeg,png,bmp,webp}

Classes are the sorted sub-folder names of ``<root>/<classes_from>`` (default ``train``). The label map is built
from that one split and reused for every split, so a ``val`` or ``test`` folder that lacks a class keeps the same
labels as ``train`` (VPT's FGVC loaders built a map per split, which shifts labels when a split lacks a class). A
split that holds a class missing from the defining split is an error.

``list`` (:class:`ListDataset`), the NOAH VTAB-1k layout::

    <root>/train800.txt  <root>/val200.txt  <root>/train800val200.txt  <root>/test.txt
    <root>/<image paths named in those files>

Each list line reads ``<path relative to root> <integer label>``. ``split`` names the list file without ``.txt``.
``num_classes`` is ``max label + 1`` over the *training* list file, option ``train_list``: by default
``train800val200`` when ``<root>/train800val200.txt`` exists, else ``train800``. Every split therefore reports
the same ``num_classes``. Class names are ``"0"``, ``"1"``, ... unless ``classes`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from vpeft.data.common import IMG_EXTENSIONS, ImageDataset, check_root, load_rgb
from vpeft.errors import ConfigError, DataError, MissingFileError


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class FolderDataset(ImageDataset):
    """Images in ``<root>/<split>/<class_name>/``, with one label map shared by all splits.

    Args:
        root: Dataset root holding one folder per split.
        split: Split folder to read (e.g. ``"train"``, ``"val"``, ``"test"``).
        transform: Applied to each RGB ``PIL.Image``.
        classes_from: Split folder whose sub-folders define the classes and their order; default ``"train"``.

    Raises:
        FileNotFoundError: When the root, the split folder or the ``classes_from`` folder is missing, or the split
            holds no images.
        ValueError: When the split holds a class folder that ``classes_from`` lacks.
    """

    def __init__(
        self, root: str | Path, split: str, transform: Callable | None = None, classes_from: str = "train"
    ) -> None:
        super().__init__(transform)
        root = check_root("folder", root, classes_from)
        check_root("folder", root, split)
        self.root, self.split = root, split
        self.classes = _class_dirs(root / classes_from)
        if not self.classes:
            raise MissingFileError(f"dataset 'folder': no class folders in {str(root / classes_from)!r}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(_class_dirs(root / split)) - set(self.classes))
        if unknown:
            raise DataError(
                f"dataset 'folder': split {split!r} has class folders {unknown} that {classes_from!r} lacks; "
                "every class must appear in the split that defines the label map"
            )
        self.samples: list[tuple[Path, int]] = []
        for name in self.classes:
            folder = root / split / name
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            self.samples.extend((p, self.class_to_idx[name]) for p in files)
        if not self.samples:
            raise MissingFileError(
                f"dataset 'folder': no images with extensions {IMG_EXTENSIONS} under {str(root / split)!r}"
            )
        self.targets = [label for _, label in self.samples]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])


def read_list(path: Path) -> list[tuple[str, int]]:
    """Parse a NOAH list file: one ``<relative path> <integer label>`` per non-blank line.

    Raises:
        ValueError: On a line without a label or with a non-integer or negative label (names file and line).
    """
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            label = int(parts[1]) if len(parts) == 2 else -1
        except ValueError:
            label = -1
        if label < 0:
            raise DataError(f"{str(path)!r} line {number}: expected '<relative path> <label>', got {line!r}")
        entries.append((parts[0], label))
    return entries


class ListDataset(ImageDataset):
    """NOAH VTAB-1k lists: ``<root>/<split>.txt`` with ``<relative path> <label>`` lines, images under ``<root>``.

    Args:
        root: Dataset root holding the list files and the images.
        split: List file name without ``.txt`` (``train800``, ``val200``, ``train800val200``, ``test``).
        transform: Applied to each RGB ``PIL.Image``.
        train_list: List file (without ``.txt``) whose labels fix ``num_classes`` (max label + 1); default
            ``train800val200`` if that file exists, else ``train800``.
        classes: Optional class names, one per label; default ``["0", "1", ...]``.

    Raises:
        FileNotFoundError: When the root or a needed list file is missing.
        ValueError: On a malformed line, or a label of ``split`` outside ``[0, num_classes)``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        train_list: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__(transform)
        root = check_root("list", root)
        if train_list is None:
            train_list = "train800val200" if (root / "train800val200.txt").is_file() else "train800"
        check_root("list", root, f"{train_list}.txt")
        check_root("list", root, f"{split}.txt")
        self.root, self.split, self.train_list = root, split, train_list
        train_labels = [label for _, label in read_list(root / f"{train_list}.txt")]
        if not train_labels:
            raise DataError(f"dataset 'list': {str(root / f'{train_list}.txt')!r} holds no entries")
        num_classes = max(train_labels) + 1
        if classes is not None and len(classes) != num_classes:
            raise ConfigError(f"dataset 'list': got {len(classes)} class names for {num_classes} classes")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        entries = read_list(root / f"{split}.txt")
        bad = [label for _, label in entries if label >= num_classes]
        if bad:
            raise DataError(
                f"dataset 'list': {split}.txt has label {max(bad)} but {train_list}.txt defines only "
                f"{num_classes} classes"
            )
        self.samples = [(root / rel, label) for rel, label in entries]
        self.targets = [label for _, label in entries]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])
