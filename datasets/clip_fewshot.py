"""CoOp's 11 few-shot datasets: lay downloaded images out under CoOp's splits, k-shot and base/novel, and check them.

    python datasets/clip_fewshot.py prepare --dataset oxford_pets --src ~/dl/oxford_pets --out data/clip \\
        --shots 1,2,4,8,16 --seeds 1,2,3
    python datasets/clip_fewshot.py verify --root data/clip --dataset oxford_pets

Inputs (nothing here downloads): each dataset's images as CoOp's DATASETS.md lays them out, and CoOp's split file
``split_zhou_<Name>.json`` beside them (``{"train"|"val"|"test": [[image path, label, class name], ...]}``, paths
relative to the image folder). ImageNet has no split file: ``--src`` holds ``images/train/<wnid>/``,
``images/val/<wnid>/`` and CoOp's ``classnames.txt`` (``<wnid> <class name>`` lines); its test split is the official
validation set, as in CoOp. FGVC-Aircraft uses its own ``images_variant_{train,val,test}.txt`` (CoOp does the same).

Output, one ``folder`` dataset per variant (``data.name: folder``; class folders named by CoOp's class names, so the
text head reads them; a link per image, ``--copy`` to copy):

    <out>/<dataset>/all/{train,val,test}/<class name>/<image>
    <out>/<dataset>/all/train_<k>shot_seed<s>/...      k images per class drawn with seed s (as CoOp's sampler:
                                                          random.sample per class)
    <out>/<dataset>/base/..., <out>/<dataset>/novel/... the same split into CoCoOp's base (first ceil(n/2) labels)
                                                          and novel classes

``verify`` counts every split's classes and images against the split file and exits 1 on a missing image or class.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vpeft.engine import cli  # noqa: E402
from vpeft.errors import DataError, MissingFileError, UnknownNameError  # noqa: E402
from vpeft.files import atomic_write  # noqa: E402

# name -> (CoOp's split file, the image folder inside --src, CoOp's prompt template)
DATASETS = {
    "imagenet": (None, "images", "a photo of a {}."),
    "caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories", "a photo of a {}."),
    "oxford_pets": ("split_zhou_OxfordPets.json", "images", "a photo of a {}, a type of pet."),
    "stanford_cars": ("split_zhou_StanfordCars.json", "", "a photo of a {}."),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "jpg", "a photo of a {}, a type of flower."),
    "food101": ("split_zhou_Food101.json", "images", "a photo of {}, a type of food."),
    "fgvc_aircraft": (None, "images", "a photo of a {}, a type of aircraft."),
    "sun397": ("split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
    "dtd": ("split_zhou_DescribableTextures.json", "images", "{} texture."),
    "eurosat": ("split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {}."),
    "ucf101": ("split_zhou_UCF101.json", "UCF-101-midframes", "a photo of a person doing {}."),
}
SPLITS = ("train", "val", "test")
Item = tuple[str, int, str]  # image path relative to the image folder, label, class name


def read_splits(name: str, src: Path) -> dict[str, list[Item]]:
    """CoOp's train/val/test of dataset ``name`` under ``src``."""
    split_file, image_dir, _ = DATASETS[name]
    if split_file is not None:
        path = src / split_file
        if not path.is_file():
            raise MissingFileError(f"{path} does not exist: put CoOp's {split_file} in --src (CoOp's DATASETS.md).")
        data = json.loads(path.read_text())
        return {s: [(p, int(y), c) for p, y, c in data[s]] for s in SPLITS}
    if name == "fgvc_aircraft":
        return _aircraft(src)
    return _imagenet(src)


def _aircraft(src: Path) -> dict[str, list[Item]]:
    names = [line.strip() for line in (src / "variants.txt").read_text().splitlines() if line.strip()]
    label = {n: i for i, n in enumerate(names)}
    out = {}
    for split in SPLITS:
        rows = (src / f"images_variant_{split}.txt").read_text().splitlines()
        items = [(f"{r[:7]}.jpg", label[r[8:].strip()], r[8:].strip()) for r in rows if r.strip()]
        out[split] = items
    return out


def _imagenet(src: Path) -> dict[str, list[Item]]:
    lines = [line.split(" ", 1) for line in (src / "classnames.txt").read_text().splitlines() if line.strip()]
    wnids = [w for w, _ in lines]
    names = {w: n.strip() for w, n in lines}
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for label, wnid in enumerate(wnids):
        for path in sorted((src / "images" / "train" / wnid).iterdir()):
            out["train"].append((f"train/{wnid}/{path.name}", label, names[wnid]))
        for path in sorted((src / "images" / "val" / wnid).iterdir()):
            out["test"].append((f"val/{wnid}/{path.name}", label, names[wnid]))
    out["val"] = out["test"]  # CoOp evaluates ImageNet on its validation set and has no other
    return out


def few_shot(items: list[Item], shots: int, seed: int) -> list[Item]:
    """``shots`` items per label, drawn as CoOp's ``generate_fewshot_dataset`` does (``random.sample`` per label)."""
    rng = random.Random(seed)
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        out += rng.sample(group, shots) if len(group) >= shots else group
    return out


def base_novel(items: list[Item], num_classes: int) -> tuple[list[Item], list[Item]]:
    """CoCoOp's ``subsample_classes``: base = the first ``ceil(n / 2)`` labels, novel = the rest."""
    cut = math.ceil(num_classes / 2)
    return [i for i in items if i[1] < cut], [i for i in items if i[1] >= cut]


def _folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


def write_split(items: list[Item], images: Path, out: Path, copy: bool) -> list[str]:
    """Link (or copy) each item to ``out/<class name>/<file>``; the paths not found under ``images``."""
    missing = []
    for rel, _, class_name in items:
        source = images / rel
        if not source.is_file():
            missing.append(str(source))
            continue
        target = out / _folder_name(class_name) / rel.replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        if copy:
            shutil.copyfile(source, target)
        else:
            os.symlink(source.resolve(), target)
    return missing


def prepare(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out) / args.dataset
    splits = read_splits(args.dataset, src)
    images = src / DATASETS[args.dataset][1]
    num_classes = len({y for _, y, _ in splits["train"]})
    variants = {"all": splits}
    base, novel = {}, {}
    for split, items in splits.items():
        base[split], novel[split] = base_novel(items, num_classes)
    variants |= {"base": base, "novel": novel}
    missing = []
    for variant, parts in variants.items():
        for split, items in parts.items():
            missing += write_split(items, images, out / variant / split, args.copy)
        for shots in [int(k) for k in args.shots.split(",") if k]:
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                chosen = few_shot(parts["train"], shots, seed)
                missing += write_split(chosen, images, out / variant / f"train_{shots}shot_seed{seed}", args.copy)
    manifest = {"dataset": args.dataset, "classes": num_classes, "template": DATASETS[args.dataset][2],
                "counts": {s: len(i) for s, i in splits.items()}}  # fmt: skip
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    if missing:
        print(f"{len(missing)} images not found under {images}, e.g. {missing[:3]}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {num_classes} classes, {manifest['counts']} -> {out}")
    return 0


def verify(args: argparse.Namespace) -> int:
    root = Path(args.root) / args.dataset
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise MissingFileError(f"{manifest_path} does not exist: run `prepare` for {args.dataset} first.")
    manifest = json.loads(manifest_path.read_text())
    problems = []
    for split, count in manifest["counts"].items():
        folder = root / "all" / split
        files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        classes = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        if len(files) != count or len(classes) != manifest["classes"]:
            problems.append(f"{split}: {len(files)} images in {len(classes)} classes, expected {count} in "
                            f"{manifest['classes']}")  # fmt: skip
    if problems:
        raise DataError(f"{root}: " + "; ".join(problems) + ". Rerun prepare with the complete --src.")
    print(f"{args.dataset}: complete ({manifest['counts']}, {manifest['classes']} classes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dataset", required=True)
    p.add_argument("--src", required=True, help="the downloaded dataset folder with CoOp's split file")
    p.add_argument("--out", required=True)
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--copy", action="store_true", help="copy images instead of linking them")
    v = sub.add_parser("verify")
    v.add_argument("--root", required=True)
    v.add_argument("--dataset", required=True)
    args = parser.parse_args(argv)
    if args.dataset not in DATASETS:
        raise UnknownNameError(f"unknown dataset {args.dataset!r}; CoOp's 11 are {', '.join(DATASETS)}.")
    return prepare(args) if args.command == "prepare" else verify(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
