"""FGVC preparation: lay downloaded images out under VPT's json splits, and check every dataset.

    python datasets/fgvc.py prepare --dataset cub --images ~/dl/CUB_200_2011/images --splits ~/dl/fgvc_split \\
        --out data/fgvc                                   # writes data/fgvc/CUB_200_2011/{images/...,*.json}
    python datasets/fgvc.py verify --root data/fgvc       # the five datasets: counts, classes, missing files

Inputs (nothing here downloads): the images of CUB-200-2011, NABirds, Oxford Flowers-102, Stanford Dogs and Stanford
Cars, and VPT's ``fgvc_split`` json files (VPT's Box/Drive links are dead since 2024, vpt#73; V-PETL mirrors them as
``XiN0919/FGVC/json.zip`` on the Hugging Face Hub; ``savadikarc/gift`` commits copies). ``--splits`` is a folder with
``train.json``, ``val.json`` and ``test.json``, directly or in a sub-folder named like the VPT folder.

Each json key is a path relative to the dataset's image dir. ``prepare`` finds every listed image under ``--images``:
first at that relative path, else by its file name anywhere below (the Stanford Cars remap: VPT lists
``car_ims/000001.jpg``, the mirror named in vpt#37 keeps the ids but not the folder), and links (default) or copies it
to ``<out>/<VPT folder>/<image dir>/<key>``; the json files are copied beside. Images it cannot find are listed and
make it exit 1. The label map is not written anywhere: :class:`vpeft.data.fgvc.FGVCDataset` builds it from
``train.json`` each time, for every split.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vpeft.data.fgvc import FGVC, SPLITS, FgvcSpec, read_split, resolve_fgvc, verify_fgvc  # noqa: E402
from vpeft.engine import cli  # noqa: E402


def split_dir(splits: Path, spec: FgvcSpec) -> Path:
    """The folder holding the three json files: ``splits`` itself or its sub-folder named after the dataset."""
    for folder in (splits, splits / spec.folder, *(splits / a for a in spec.aliases), splits / spec.name):
        if all((folder / f"{s}.json").is_file() for s in SPLITS):
            return folder
    raise FileNotFoundError(
        f"{splits}: no train.json, val.json and test.json for {spec.name!r} (looked in the folder itself and in "
        f"{spec.folder!r})"
    )


def prepare(spec: FgvcSpec, images: Path, splits: Path, out: Path, mode: str = "symlink") -> list[str]:
    """Lay out one dataset under ``out/<VPT folder>``; returns the json keys whose image was not found."""
    source = split_dir(splits, spec)
    keys = sorted({key for s in SPLITS for key in read_split(source / f"{s}.json")})
    by_name: dict[str, Path] = {}
    if not all((images / key).is_file() for key in keys):
        for path in images.rglob("*"):
            by_name.setdefault(path.name, path)
    target = out / spec.folder
    target.mkdir(parents=True, exist_ok=True)
    missing = []
    for key in keys:
        found = images / key if (images / key).is_file() else by_name.get(Path(key).name)
        if found is None:
            missing.append(key)
            continue
        dest = target / spec.image_dir / key
        if dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mode == "symlink":
            os.symlink(found.resolve(), dest)
        else:
            shutil.copy2(found, dest)
    for s in SPLITS:
        shutil.copy2(source / f"{s}.json", target / f"{s}.json")
    return missing


def verify(root: Path, specs: list[FgvcSpec]) -> int:
    """Print one row per dataset and every problem; return 1 when anything is wrong."""
    print("| dataset | folder | classes | train | val | test | status |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    failures = {}
    for spec in specs:
        problems = verify_fgvc(root / spec.folder, spec)
        sizes = " | ".join(str(spec.sizes[s]) for s in SPLITS)
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"| {spec.name} | {spec.folder} | {spec.num_classes} | {sizes} | {status} |")
        if problems:
            failures[spec.name] = problems
    for name, problems in failures.items():
        print(f"\n{name}:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\n{len(specs) - len(failures)}/{len(specs)} datasets complete under {root} (expected sizes shown)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="lay one dataset's images out under its VPT json splits")
    prep.add_argument("--dataset", required=True, help=f"one of {', '.join(FGVC)} (or a VPT name)")
    prep.add_argument("--images", type=Path, required=True, help="the downloaded images")
    prep.add_argument("--splits", type=Path, required=True, help="folder with VPT's train/val/test json files")
    prep.add_argument("--out", type=Path, required=True, help="FGVC data root, e.g. data/fgvc")
    prep.add_argument("--mode", choices=("symlink", "copy"), default="symlink")
    ver = sub.add_parser("verify", help="check every dataset's json splits, counts, classes and images")
    ver.add_argument("--root", type=Path, required=True)
    ver.add_argument("--datasets", help="comma-separated names (default: all five)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        spec = resolve_fgvc(args.dataset)
        if not args.images.is_dir():
            parser.error(f"--images {args.images} is not a folder")
        missing = prepare(spec, args.images, args.splits, args.out, args.mode)
        if missing:
            print(f"{len(missing)} listed images not found under {args.images}, e.g. {missing[:5]}")
        return verify(args.out, [spec]) or (1 if missing else 0)
    specs = [resolve_fgvc(n) for n in args.datasets.split(",")] if args.datasets else list(FGVC.values())
    return verify(args.root, specs)


if __name__ == "__main__":
    sys.exit(cli.run(main))
