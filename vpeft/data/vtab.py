"""VTAB-1k tasks in the NOAH JPEG layout: the task table, a dataset class, a writer and a checker.

Layout of one task (NOAH's ``get_vtab1k.py``; FacT, SSF, SPT, V-PETL and PETL_Vision read the same)::

    <task>/train800.txt  val200.txt  train800val200.txt  test.txt     lines: images/<split>/000000.jpg <label>
    <task>/images/{train800,val200,train800val200,test}/000000.jpg ...

``VTAB1K`` lists the 19 tasks of Zhai et al., "A Large-scale Study of Representation Learning with the Visual Task
Adaptation Benchmark" (arXiv 1910.04867) with their group, class count, split sizes and the other names the public
codebases use for their folders (NOAH writes ``cifar`` and ``oxford_iiit_pet``; its scripts, SSF and V-PETL ask for
``cifar100``, ``oxford_pet`` or ``pets``). ``MINIVTAB`` is the offline suite that ``datasets/minivtab.py`` builds in
the same layout. :func:`resolve_task` maps any of those names to its :class:`VtabTask`; :func:`task_folder` finds the
folder a copy actually uses.

:class:`VtabDataset` (registry name ``vtab``) reads one task folder. Its class count is the table's for a known
task, else ``max label + 1`` over the training-side lists (``train800``, ``val200``, ``train800val200``), so every
split reports one count even when ``val200`` lacks some classes.
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vpeft.data.common import ImageDataset, check_root, load_rgb
from vpeft.data.folder import read_list
from vpeft.errors import ConfigError, DataError, ExistingPathError, MissingFileError, UnknownNameError
from vpeft.registry import lookup

SPLITS = ("train800", "val200", "train800val200", "test")
TRAIN_LISTS = ("train800val200", "train800", "val200")  # the lists whose labels define the classes
GROUPS = ("natural", "specialized", "structured")
PREPARE = "python datasets/vtab1k.py prepare --src <downloaded copy> --out <data root>"


@dataclass(frozen=True)
class VtabTask:
    """One task: canonical folder name, group, class count, split sizes and the other names it goes by."""

    name: str
    group: str
    num_classes: int
    test_size: int
    aliases: tuple[str, ...] = ()
    train_size: int = 800
    val_size: int = 200
    source: str = ""  # where the images come from (task_adaptation spec, or the MiniVTAB generator)
    sizes: dict[str, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        sizes = {"train800": self.train_size, "val200": self.val_size}
        sizes |= {"train800val200": self.train_size + self.val_size, "test": self.test_size}
        object.__setattr__(self, "sizes", sizes)


def _task(name, group, classes, test, aliases=(), source=""):
    return VtabTask(name, group, classes, test, tuple(aliases), source=source)


# Class counts: VPT tune_vtab.py DATA2CLS = NOAH lib/datasets.py = FacT _CLASSES_NUM. Test sizes: the
# task_adaptation split definitions on the TFDS versions VPT pinned (../shared/notes/bench.md, section 2).
VTAB1K: dict[str, VtabTask] = {
    t.name: t
    for t in [
        _task("cifar", "natural", 100, 10000, ["cifar100", "cifar_100", "cifar(num_classes=100)"], "cifar100:3.0.2"),
        _task("caltech101", "natural", 102, 6084, ["caltech"], "caltech101:3.0.1"),
        _task("dtd", "natural", 47, 1880, [], "dtd:3.0.1"),
        _task(
            "oxford_flowers102",
            "natural",
            102,
            6149,
            ["flowers102", "oxford_flowers", "flowers"],
            "oxford_flowers102:2.1.1",
        ),
        _task("oxford_iiit_pet", "natural", 37, 3669, ["oxford_pet", "pets", "pet"], "oxford_iiit_pet:3.2.0"),
        _task("svhn", "natural", 10, 26032, ["svhn_cropped"], "svhn_cropped:3.0.0"),
        _task("sun397", "natural", 397, 21750, ["sun"], "sun397/tfds:4.0.0"),
        _task("patch_camelyon", "specialized", 2, 32768, ["camelyon", "pcam"], "patch_camelyon:2.0.0"),
        _task("eurosat", "specialized", 10, 5400, [], "eurosat/rgb:2.0.0"),
        _task("resisc45", "specialized", 45, 6300, ["resisc"], "resisc45:3.0.0"),
        _task(
            "diabetic_retinopathy",
            "specialized",
            5,
            42670,
            ["retinopathy", "diabetic_retinopathy_detection", 'diabetic_retinopathy(config="btgraham-300")'],
            "diabetic_retinopathy_detection/btgraham-300:3.0.0",
        ),
        _task("clevr_count", "structured", 8, 15000, ['clevr(task="count_all")', "clevr_count_all"], "clevr:3.1.0"),
        _task(
            "clevr_dist",
            "structured",
            6,
            15000,
            ['clevr(task="closest_object_distance")', "clevr_distance"],
            "clevr:3.1.0",
        ),
        _task("dmlab", "structured", 6, 22735, [], "dmlab:2.0.1"),
        _task("kitti", "structured", 4, 711, ['kitti(task="closest_vehicle_distance")', "kitti_dist"], "kitti:3.2.0"),
        _task("dsprites_loc", "structured", 16, 73728, ["dsprites_location", "dsprites_xpos"], "dsprites:2.0.0"),
        _task("dsprites_ori", "structured", 16, 73728, ["dsprites_orientation"], "dsprites:2.0.0"),
        _task("smallnorb_azi", "structured", 18, 12150, ["smallnorb_azimuth"], "smallnorb:2.0.0"),
        _task("smallnorb_ele", "structured", 9, 12150, ["smallnorb_elevation"], "smallnorb:2.0.0"),
    ]
}

# The offline suite of datasets/minivtab.py: 32x32 images, the VTAB-1k split sizes, a 500-image test split.
MINIVTAB: dict[str, VtabTask] = {
    t.name: t
    for t in [
        _task("mini_fashion", "natural", 10, 500, ["fashion"], "Fashion-MNIST t10k (Debian dataset-fashion-mnist)"),
        _task("mini_digits", "natural", 10, 500, ["digits"], "scikit-learn load_digits, 8x8 upscaled"),
        _task("mini_lesion", "specialized", 2, 500, ["lesion"], "MONAI create_test_image_2d: lesion present or not"),
        _task("mini_grade", "specialized", 5, 500, ["grade"], "MONAI create_test_image_2d: 0-4 lesions (grade)"),
        _task("mini_count", "structured", 8, 500, ["count"], "procedural: count of 1-8 shapes"),
        _task("mini_location", "structured", 8, 500, ["location"], "procedural: x position of one sprite, 8 bins"),
        _task("mini_orientation", "structured", 8, 500, ["orientation"], "procedural: rotation of an arrow, 8 bins"),
        _task("mini_distance", "structured", 6, 500, ["distance"], "procedural: closest object distance bin"),
    ]
}

SUITES: dict[str, dict[str, VtabTask]] = {"vtab1k": VTAB1K, "minivtab": MINIVTAB}


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "")
    return key.removeprefix("vtab_")


def _names(table: Mapping[str, VtabTask]) -> dict[str, VtabTask]:
    return {_key(n): t for t in table.values() for n in (t.name, *t.aliases)}


def resolve_task(name: str, suite: str | None = None) -> VtabTask:
    """The task ``name`` names: a canonical name or an alias, any case, ``-`` or ``_``, optional ``vtab-`` prefix.

    Args:
        name: e.g. ``cifar100``, ``vtab-cifar``, ``Oxford_Pet``, ``mini_count``.
        suite: ``"vtab1k"`` or ``"minivtab"`` to search one table; ``None`` searches both.

    Raises:
        KeyError: for an unknown name, with close matches and the canonical names.
    """
    tables = [lookup(SUITES, suite, "task suite")] if suite else list(SUITES.values())
    names: dict[str, VtabTask] = {}
    for table in tables:
        names |= _names(table)
    if _key(name) in names:
        return names[_key(name)]
    close = difflib.get_close_matches(_key(name), list(names), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(n) for n in dict.fromkeys(names[c].name for c in close))}?" if close else ""
    valid = ", ".join(t.name for table in tables for t in table.values())
    raise UnknownNameError(f"unknown VTAB task {name!r}.{hint} Known tasks: {valid} (or an alias of one).")


def task_folder(data_root: str | Path, task: VtabTask) -> Path:
    """The folder of ``task`` under ``data_root``: the canonical name, else the first alias that exists.

    Raises:
        FileNotFoundError: naming every folder name tried and the prepare command.
    """
    data_root = Path(data_root).expanduser()
    tried = [task.name, *(a for a in task.aliases if "(" not in a)]
    for name in tried:
        if (data_root / name).is_dir():
            return data_root / name
    raise MissingFileError(
        f"VTAB task {task.name!r}: none of the folders {tried} exists under {str(data_root)!r}. Bring a downloaded "
        f"copy into the NOAH layout with `{PREPARE}`."
    )


class VtabDataset(ImageDataset):
    """One VTAB-1k-layout task folder: ``<root>/<split>.txt`` lists, images under ``<root>``.

    Args:
        root: The task folder.
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: Applied to each RGB ``PIL.Image``.
        task: Name or alias of a task of ``VTAB1K``/``MINIVTAB``; fixes the class count from the table. ``None``
            (a task the tables do not know): ``max label + 1`` over the training-side lists present.

    Raises:
        FileNotFoundError: a missing root or list file (with the prepare command).
        ValueError: an unknown split, a malformed line, or a label outside ``[0, num_classes)``.
    """

    def __init__(
        self, root: str | Path, split: str, transform: Callable | None = None, task: str | None = None
    ) -> None:
        super().__init__(transform)
        if split not in SPLITS:
            raise ConfigError(f"dataset 'vtab': unknown split {split!r}; VTAB-1k splits are {', '.join(SPLITS)}")
        root = check_root("list", root, f"{split}.txt")
        self.root, self.split = root, split
        self.task = resolve_task(task) if task else None
        if self.task is not None:
            num_classes, source = self.task.num_classes, f"the {self.task.name!r} table entry"
        else:
            labels = [lab for name in TRAIN_LISTS if (root / f"{name}.txt").is_file() for _, lab in _list(root, name)]
            if not labels:
                raise MissingFileError(f"dataset 'vtab': {str(root)!r} holds none of {[f'{n}.txt' for n in SPLITS]}")
            num_classes, source = max(labels) + 1, "the training lists"
        self.classes = [str(i) for i in range(num_classes)]
        entries = _list(root, split)
        bad = sorted({label for _, label in entries if label >= num_classes})
        if bad:
            raise DataError(
                f"dataset 'vtab': {str(root / f'{split}.txt')!r} has labels {bad[:5]} but {source} gives "
                f"{num_classes} classes (labels 0..{num_classes - 1})"
            )
        self.samples = [(root / rel, label) for rel, label in entries]
        self.targets = [label for _, label in entries]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])


def _list(root: Path, split: str) -> list[tuple[str, int]]:
    return read_list(root / f"{split}.txt")


def write_task(
    out: str | Path, splits: Mapping[str, Sequence[tuple[Image.Image, int]]], quality: int = 95, overwrite=False
) -> Path:
    """Write one task in the NOAH layout from ``train800``, ``val200`` and ``test`` ``(image, label)`` lists.

    ``train800val200`` gets its own copies of the images (``train800`` then ``val200``), as NOAH's script writes.
    The task is built in a temporary sibling folder and renamed into place, so a crash leaves no half task.

    Args:
        out: The task folder to create.
        splits: ``{"train800": [...], "val200": [...], "test": [...]}``.
        quality: JPEG quality (NOAH saves with PIL's default, 75).
        overwrite: Replace an existing ``out``; otherwise an existing folder is an error.
    """
    out = Path(out)
    missing = {"train800", "val200", "test"} - set(splits)
    if missing:
        raise ConfigError(f"write_task: missing splits {sorted(missing)}; give train800, val200 and test")
    if out.exists() and not overwrite:
        raise ExistingPathError(f"{out} exists; remove it or pass overwrite=True")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    items = {**splits, "train800val200": [*splits["train800"], *splits["val200"]]}
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)
        lines = []
        for index, (image, label) in enumerate(items[split]):
            rel = f"images/{split}/{index:06d}.jpg"
            image.convert("RGB").save(tmp / rel, quality=quality)
            lines.append(f"{rel} {int(label)}\n")
        (tmp / f"{split}.txt").write_text("".join(lines))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def verify_task(folder: str | Path, task: VtabTask | None = None, open_images: bool = False) -> list[str]:
    """Every problem of one task folder, as sentences; an empty list means the folder is complete.

    Checks: the folder and four list files exist and parse; split sizes match the table (``task`` given) or the
    VTAB-1k sizes 800/200/1000; labels lie in ``[0, num_classes)``; ``train800val200`` holds exactly the labels of
    ``train800`` plus ``val200``; no list names a file twice or a file that is missing (or, with ``open_images``,
    one PIL cannot read).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: folder missing"]
    problems, lists = [], {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.is_file():
            problems.append(f"{path}: list file missing")
            continue
        try:
            lists[split] = read_list(path)
        except ValueError as err:
            problems.append(str(err))
    expected = task.sizes if task else {"train800": 800, "val200": 200, "train800val200": 1000}
    for split, entries in lists.items():
        where = folder / f"{split}.txt"
        if split in expected and len(entries) != expected[split]:
            problems.append(f"{where}: {len(entries)} entries, expected {expected[split]}")
        if task and any(label >= task.num_classes for _, label in entries):
            top = max(label for _, label in entries)
            problems.append(f"{where}: label {top} out of range for {task.num_classes} classes")
        twice = [rel for rel, n in Counter(rel for rel, _ in entries).items() if n > 1]
        if twice:
            problems.append(f"{where}: {len(twice)} paths listed more than once, e.g. {twice[0]}")
        absent = [rel for rel, _ in entries if not (folder / rel).is_file()]
        if absent:
            problems.append(f"{where}: {len(absent)} image files missing, e.g. {absent[:3]}")
        elif open_images:
            unreadable = [rel for rel, _ in entries if not _readable(folder / rel)]
            if unreadable:
                problems.append(f"{where}: {len(unreadable)} images PIL cannot read, e.g. {unreadable[:3]}")
    if {"train800", "val200", "train800val200"} <= set(lists):
        union = Counter(lab for s in ("train800", "val200") for _, lab in lists[s])
        if union != Counter(lab for _, lab in lists["train800val200"]):
            problems.append(f"{folder / 'train800val200.txt'}: labels differ from train800 + val200")
    return problems


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for a broken file
        return False
