"""The five FGVC datasets with VPT's json splits: the dataset table, a dataset class and a checker.

Layout of one dataset (VPT's ``fgvc_split`` README; Jia et al., "Visual Prompt Tuning", ECCV 2022)::

    <root>/train.json  val.json  test.json          {"<image path relative to the image dir>": <class id>, ...}
    <root>/<image dir>/<those paths>                image dir: images/ (CUB, NABirds), Images/ (Dogs), . (others)

Class ids are dataset ids (CUB's are zero-padded strings such as ``"001"``, the others integers). The label map
(sorted ids -> ``0..C-1``, numerically when every id is an integer) is built **once, from the training split**, and
shared by every split. VPT's ``JSONDataset`` built it per split, which shifts the labels of NABirds' ``val.json``
(553 of the 555 classes) against ``train.json``; V-PETL copied that code. A val or test id missing from the training
split is an error here.

``FGVC`` holds the VPT split counts (counted in the committed copies of ``savadikarc/gift``) and the names the
codebases use (VPT ``DATA.NAME``, V-PETL and SSF folder names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vpeft.data.common import ImageDataset, load_rgb
from vpeft.errors import DataError, MissingFileError, UnknownNameError

SPLITS = ("train", "val", "test")
PREPARE = "python datasets/fgvc.py prepare --dataset <name> --images <downloaded images> --splits <json dir> --out ..."


@dataclass(frozen=True)
class FgvcSpec:
    """One FGVC dataset: canonical name, VPT folder, image dir, class count, split sizes, other names."""

    name: str
    folder: str
    image_dir: str
    num_classes: int
    sizes: dict[str, int]
    aliases: tuple[str, ...] = ()
    val_classes: int | None = None  # classes present in val.json when fewer than num_classes


FGVC: dict[str, FgvcSpec] = {
    s.name: s
    for s in [
        FgvcSpec("cub", "CUB_200_2011", "images", 200, {"train": 5394, "val": 600, "test": 5794}, ("cub_200_2011",)),
        FgvcSpec(
            "nabirds", "nabirds", "images", 555, {"train": 21536, "val": 2393, "test": 24633}, (), val_classes=553
        ),
        FgvcSpec(
            "oxford_flowers",
            "OxfordFlower",
            "",
            102,
            {"train": 1020, "val": 1020, "test": 6149},
            ("oxfordflowers", "oxfordflower", "flowers"),
        ),
        FgvcSpec(
            "stanford_dogs",
            "Stanford-dogs",
            "Images",
            120,
            {"train": 10800, "val": 1200, "test": 8580},
            ("stanforddogs", "dogs"),
        ),
        FgvcSpec(
            "stanford_cars",
            "Stanford-cars",
            "",
            196,
            {"train": 7329, "val": 815, "test": 8041},
            ("stanfordcars", "cars"),
        ),
    ]
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_fgvc(name: str) -> FgvcSpec:
    """The dataset ``name`` names: canonical, VPT folder or an alias (``CUB``, ``StanfordCars``, ``Stanford-dogs``)."""
    names = {_key(n): s for s in FGVC.values() for n in (s.name, s.folder, *s.aliases)}
    if _key(name) in names:
        return names[_key(name)]
    raise UnknownNameError(f"unknown FGVC dataset {name!r}; known: {', '.join(FGVC)} (or their VPT folder names)")


def read_split(path: Path) -> dict[str, str | int]:
    """A VPT split file: a json object from relative image path to class id.

    Raises:
        ValueError: when the file is not json or not such an object (names the file and the first bad entry).
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{str(path)!r} is not valid json: {err}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{str(path)!r}: expected a non-empty json object {{image path: class id}}")
    for rel, cls in data.items():
        if not isinstance(cls, (int, str)) or isinstance(cls, bool):
            raise DataError(f"{str(path)!r}: entry {rel!r} has class {cls!r}; expected an integer or string id")
    return data


def class_key(cls: str | int) -> str:
    """The id a class goes by: ``"007"``, ``"7"`` and ``7`` are one class (``"7"``); other strings stay as they are."""
    text = str(cls).strip()
    return str(int(text)) if text.lstrip("-").isdigit() else text


def label_map(ids) -> dict[str, int]:
    """Sorted class ids -> ``0..C-1``, keyed by :func:`class_key`; numeric order when every id is an integer."""
    unique = {class_key(i) for i in ids}
    numeric = all(u.lstrip("-").isdigit() for u in unique)
    return {u: i for i, u in enumerate(sorted(unique, key=int) if numeric else sorted(unique))}


class FGVCDataset(ImageDataset):
    """One FGVC dataset in VPT's json layout, with a label map built once from ``label_map_from``.

    Args:
        root: The dataset folder holding ``train.json``, ``val.json``, ``test.json``.
        split: ``train``, ``val`` or ``test`` (any ``<split>.json`` in ``root`` works).
        transform: Applied to each RGB ``PIL.Image``.
        dataset: Name of a known dataset (``cub``, ``nabirds``, ...): sets the image dir and checks the class count.
        image_dir: Folder of the images, relative to ``root``; default the table's, else ``images`` or ``Images``
            when present, else ``root`` itself.
        label_map_from: Split whose class ids define the labels; default ``train``.

    Raises:
        FileNotFoundError: a missing root or json file (with the prepare command).
        ValueError: malformed json, a class count that differs from the table, or ids absent from the label split.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        dataset: str | None = None,
        image_dir: str | None = None,
        label_map_from: str = "train",
    ) -> None:
        super().__init__(transform)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise MissingFileError(f"dataset 'fgvc': root folder {str(root)!r} does not exist. {PREPARE}")
        for name in (label_map_from, split):
            if not (root / f"{name}.json").is_file():
                raise MissingFileError(f"dataset 'fgvc': {str(root / f'{name}.json')!r} is missing. {PREPARE}")
        spec = resolve_fgvc(dataset) if dataset else None
        if image_dir is None:
            image_dir = spec.image_dir if spec else next((d for d in ("images", "Images") if (root / d).is_dir()), "")
        self.root, self.split, self.image_dir = root, split, root / image_dir
        self.class_to_idx = label_map(read_split(root / f"{label_map_from}.json").values())
        count = len(self.class_to_idx)
        if spec and count != spec.num_classes:
            raise DataError(
                f"dataset 'fgvc': {label_map_from}.json of {spec.name!r} holds {count} classes, expected "
                f"{spec.num_classes}; the label map must come from a split that holds every class"
            )
        self.classes = list(self.class_to_idx)  # ids in label order
        entries = read_split(root / f"{split}.json")
        unknown = sorted({str(c) for c in entries.values() if class_key(c) not in self.class_to_idx})
        if unknown:
            raise DataError(
                f"dataset 'fgvc': {split}.json has class ids {unknown[:5]} that {label_map_from}.json lacks; "
                "labels come from that split only"
            )
        self.samples = [(self.image_dir / rel, self.class_to_idx[class_key(c)]) for rel, c in entries.items()]
        self.targets = [label for _, label in self.samples]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])


def verify_fgvc(root: str | Path, spec: FgvcSpec | None = None, image_dir: str | None = None) -> list[str]:
    """Every problem of one FGVC dataset folder, as sentences; an empty list means it is complete.

    Checks: the folder and three json files exist and parse; split sizes and class counts match the table
    (``spec`` given); val/test ids all occur in train; every listed image file exists.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: folder missing"]
    image_dir = image_dir if image_dir is not None else (spec.image_dir if spec else "")
    problems, splits = [], {}
    for split in SPLITS:
        path = root / f"{split}.json"
        if not path.is_file():
            problems.append(f"{path}: split file missing")
            continue
        try:
            splits[split] = read_split(path)
        except ValueError as err:
            problems.append(str(err))
    train_map = label_map(splits["train"].values()) if "train" in splits else None
    for split, entries in splits.items():
        path = root / f"{split}.json"
        if spec and len(entries) != spec.sizes[split]:
            problems.append(f"{path}: {len(entries)} images, expected {spec.sizes[split]}")
        classes = len({class_key(c) for c in entries.values()})
        want = spec.val_classes if spec and split == "val" and spec.val_classes else spec.num_classes if spec else None
        if want and classes != want:
            problems.append(f"{path}: {classes} classes, expected {want}")
        if train_map is not None and split != "train":
            unknown = sorted({str(c) for c in entries.values() if class_key(c) not in train_map})
            if unknown:
                problems.append(f"{path}: class ids {unknown[:5]} do not occur in train.json")
        absent = [rel for rel in entries if not (root / image_dir / rel).is_file()]
        if absent:
            problems.append(f"{path}: {len(absent)} image files missing under {root / image_dir}, e.g. {absent[:3]}")
    return problems
