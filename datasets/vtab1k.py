"""VTAB-1k preparation: bring a downloaded NOAH-format copy into the canonical layout, check it, list the aliases.

    python datasets/vtab1k.py prepare --src ~/Downloads/vtab-1k --out data/vtab-1k      # symlinks by default
    python datasets/vtab1k.py verify --root data/vtab-1k                                # every task, every count
    python datasets/vtab1k.py verify --root work_dirs/data/minivtab --suite minivtab
    python datasets/vtab1k.py aliases                                                   # the task-name table

Where the JPEGs come from (nothing here downloads): NOAH's ``data/vtab-source/get_vtab1k.py`` or the seeded
re-implementation ``OSU-MLB/MLB-VTAB`` export the 19 tasks from TFDS (pin the TFDS versions VPT lists; Retinopathy,
RESISC45 and SUN397 need manual downloads), or take one of the circulating copies (SSF, RepAdapter, V-PETL's
``XiN0919/VTAB-1k``, PETL_Vision). The copies disagree on folder names (``cifar`` / ``cifar100``, ``oxford_iiit_pet``
/ ``oxford_pet`` / ``pets``) and some lack ``train800val200``.

``prepare`` finds each task in ``--src`` (top level or one folder down) under any of its names, and writes
``<out>/<canonical name>/`` with the four list files (``train800val200.txt`` rebuilt from ``train800`` + ``val200``
when the copy has none; paths use ``/``) and the ``images`` folder linked (``--mode symlink``, the default) or copied.
Then it runs ``verify``. ``verify`` prints one row per task and every problem found; it exits 1 if there is any.
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

from vpeft.data.folder import read_list  # noqa: E402
from vpeft.data.vtab import SPLITS, SUITES, VtabTask, resolve_task, task_folder, verify_task  # noqa: E402
from vpeft.engine import cli  # noqa: E402
from vpeft.files import atomic_write  # noqa: E402


def _candidates(src: Path) -> list[Path]:
    """``src`` and its sub-folders: a task may sit at the top level of a download or one folder down."""
    return [src, *sorted(p for p in src.iterdir() if p.is_dir())]


def find_source(src: Path, task: VtabTask) -> Path | None:
    """The folder of ``task`` in a download: the first of its names (canonical, then aliases) that exists."""
    for base in _candidates(src):
        for name in (task.name, *task.aliases):
            if "(" not in name and (base / name / "images").is_dir():
                return base / name
    return None


def prepare_task(source: Path, out: Path, mode: str = "symlink") -> list[str]:
    """Write ``out`` (the canonical task folder) from ``source``; returns notes on what was changed."""
    notes = []
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; remove it first (prepare never overwrites a task folder)")
    lists = {}
    for split in SPLITS:
        path = source / f"{split}.txt"
        if path.is_file():
            lists[split] = [(rel.replace("\\", "/"), label) for rel, label in read_list(path)]
    if "train800val200" not in lists and {"train800", "val200"} <= set(lists):
        lists["train800val200"] = lists["train800"] + lists["val200"]
        notes.append("train800val200.txt rebuilt from train800 + val200 (it points at their images)")
    out.mkdir(parents=True)
    for split, entries in lists.items():
        text = "".join(f"{rel} {label}\n" for rel, label in entries)
        atomic_write(out / f"{split}.txt", lambda tmp, text=text: Path(tmp).write_text(text))
    if mode == "symlink":
        os.symlink((source / "images").resolve(), out / "images", target_is_directory=True)
    else:
        shutil.copytree(source / "images", out / "images")
    return notes


def prepare(src: Path, out: Path, tasks: list[VtabTask], mode: str) -> int:
    missing = []
    for task in tasks:
        source = find_source(src, task)
        if source is None:
            missing.append(task.name)
            continue
        notes = prepare_task(source, out / task.name, mode)
        print(f"{task.name}: {source} -> {out / task.name} ({mode}){'; ' + '; '.join(notes) if notes else ''}")
    if missing:
        print(f"not in {src} under any of their names: {', '.join(missing)}")
    return verify(out, tasks) or (1 if missing else 0)


def _row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def verify(root: Path, tasks: list[VtabTask], open_images: bool = False) -> int:
    """Print one row per task and every problem; return 1 when anything is wrong."""
    print(f"| task | group | classes | folder | {' | '.join(SPLITS)} | status |")
    print(f"| --- | --- | ---: | --- | {' | '.join('---:' for _ in SPLITS)} | --- |")
    failures = {}
    for task in tasks:
        try:
            folder = task_folder(root, task)
        except FileNotFoundError as err:
            failures[task.name] = [str(err)]
            print(_row(task.name, task.group, task.num_classes, "-", *["-"] * len(SPLITS), "missing"))
            continue
        problems = verify_task(folder, task, open_images)
        if folder.name != task.name:
            problems.append(f"{folder}: found under the alias {folder.name!r}; `prepare` writes {task.name!r}")
        counts = [
            str(sum(1 for line in (folder / f"{s}.txt").read_text().splitlines() if line.strip()))
            if (folder / f"{s}.txt").is_file()
            else "-"
            for s in SPLITS
        ]
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(_row(task.name, task.group, task.num_classes, folder.name, *counts, status))
        if problems:
            failures[task.name] = problems
    for name, problems in failures.items():
        print(f"\n{name}:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\n{len(tasks) - len(failures)}/{len(tasks)} tasks complete under {root}")
    return 1 if failures else 0


def alias_table() -> str:
    lines = ["| suite | task | group | classes | test | other names | source |"]
    lines.append("| --- | --- | --- | ---: | ---: | --- | --- |")
    for suite, table in SUITES.items():
        for t in table.values():
            names = ", ".join(f"`{a}`" for a in t.aliases)
            row = [suite, f"`{t.name}`", t.group, t.num_classes, t.test_size, names, t.source]
            lines.append(_row(*row))
    return "\n".join(lines)


def _tasks(suite: str, names: str | None) -> list[VtabTask]:
    if names:
        return [resolve_task(n, suite) for n in names.split(",")]
    return list(SUITES[suite].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="canonical layout from a downloaded NOAH-format copy")
    prep.add_argument("--src", type=Path, required=True, help="the downloaded copy (task folders inside)")
    prep.add_argument("--out", type=Path, required=True, help="data root to write, e.g. data/vtab-1k")
    prep.add_argument("--mode", choices=("symlink", "copy"), default="symlink", help="how the images get there")
    prep.add_argument("--tasks", help="comma-separated task names or aliases (default: all 19)")
    ver = sub.add_parser("verify", help="check every task's folder, lists, counts and images")
    ver.add_argument("--root", type=Path, required=True, help="data root holding one folder per task")
    ver.add_argument("--suite", choices=sorted(SUITES), default="vtab1k")
    ver.add_argument("--tasks", help="comma-separated task names or aliases (default: the whole suite)")
    ver.add_argument("--open-images", action="store_true", help="also decode every image with PIL (slow)")
    sub.add_parser("aliases", help="print the task-name table (markdown)")
    args = parser.parse_args(argv)
    if args.command == "aliases":
        print(alias_table())
        return 0
    if args.command == "prepare":
        if not args.src.is_dir():
            parser.error(f"--src {args.src} is not a folder")
        return prepare(args.src, args.out, _tasks("vtab1k", args.tasks), args.mode)
    return verify(args.root, _tasks(args.suite, args.tasks), args.open_images)


if __name__ == "__main__":
    sys.exit(cli.run(main))
