"""Suites: which tasks, which recipe, which seeds and grids; read from ``configs/bench/<suite>.yaml``.

A suite file (paths relative to it)::

    recipe: ../_base_/vtab1k.yaml          # the run config every run starts from (tools/train.py format)
    tasks: vtab1k                          # a task table: vtab1k | minivtab (vpeft.data.vtab) | fgvc
    data_root: data/vtab-1k                # one folder per task below it
    seeds: [42, 44, 82, 100, 800]          # --seeds N runs the first N
    set: [model.pretrained=checkpoints/ViT-B_16.npz]      # overrides for every run
    method_set: {spt_lora: [method.param_budget=0.012]}   # overrides for one method
    protocols:
      standard: {tune: [train800, val200], final: [train800val200, test], grid: {optim.lr: [1.0e-3, 5.0e-3]}}
      literature: {final: [train800val200, test], eval_every: 1}

:func:`resolve_tasks` turns task names (canonical or aliases) into :class:`TaskRef` objects holding the data
settings of one task; a folder the tables do not know (``--data-root DIR --tasks NAME``) becomes a ``custom`` task
whose class count the dataset reads from its lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpeft.data.fgvc import FGVC, resolve_fgvc
from vpeft.data.vtab import SUITES, VtabTask, resolve_task, task_folder
from vpeft.errors import ConfigError, MissingFileError, UnknownNameError

ROOT = Path(__file__).resolve().parents[2]
SUITE_DIR = ROOT / "configs" / "bench"
TABLES = ("vtab1k", "minivtab", "fgvc")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Protocol(_Strict):
    """Splits of a protocol: ``tune`` (train, eval) for the grid search, ``final`` (train, eval) for the report."""

    tune: tuple[str, str] | None = None
    final: tuple[str, str]
    grid: dict[str, list[Any]] = {}
    eval_every: int = Field(1, ge=1)  # literature: how often the test split is evaluated for best-over-epochs
    set: list[str] = []


class Suite(_Strict):
    """One suite file, validated; ``path`` is where it came from (relative paths resolve against its folder)."""

    name: str = ""
    path: Path = Path()
    recipe: str
    tasks: str
    data_root: str
    build: str | None = None  # a script that builds the data when data_root is missing (MiniVTAB)
    seeds: list[int] = Field(min_length=1)
    set: list[str] = []
    method_set: dict[str, list[str]] = {}
    protocols: dict[str, Protocol]

    def recipe_path(self) -> Path:
        return (self.path.parent / self.recipe).resolve()

    def default_root(self) -> Path:
        return ROOT / self.data_root if not Path(self.data_root).is_absolute() else Path(self.data_root)


def load_suite(name_or_path: str) -> Suite:
    """``configs/bench/<name>.yaml``, or a suite file path; errors name the file and the bad key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))
        raise MissingFileError(f"suite {name_or_path!r}: {path} does not exist; known suites: {', '.join(known)}")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        suite = Suite.model_validate({**data, "name": path.stem, "path": path})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False))
        raise ConfigError(f"suite file {path}: {problems}") from None
    if suite.tasks not in TABLES:
        raise ConfigError(f"suite file {path}: tasks {suite.tasks!r} is not one of {', '.join(TABLES)}")
    return suite


@dataclass(frozen=True)
class TaskRef:
    """One task as the harness runs it: name, group, folder and the run-config overrides that read it."""

    name: str
    group: str
    root: Path
    overrides: tuple[str, ...] = field(default=())


def suite_task_names(suite: Suite) -> list[str]:
    return list(FGVC) if suite.tasks == "fgvc" else list(SUITES[suite.tasks])


def _vtab_ref(task: VtabTask, data_root: Path) -> TaskRef:
    try:
        folder = task_folder(data_root, task)
    except FileNotFoundError:
        folder = data_root / task.name  # reported when the run starts, as that run's failure
    return TaskRef(task.name, task.group, folder, ("data.name=vtab", f"data.options.task={task.name}"))


def resolve_tasks(suite: Suite, names: list[str] | None, data_root: Path) -> list[TaskRef]:
    """The tasks to run: the suite's (``names`` None) or the named ones, canonical or alias.

    A name the tables do not know but that is a folder under ``data_root`` holding ``train800.txt`` or ``train.json``
    runs as a ``custom`` task (VTAB layout or FGVC json layout); anything else raises naming the known tasks.
    """
    refs = []
    for name in names or suite_task_names(suite):
        folder = data_root / name
        if suite.tasks == "fgvc":
            try:
                spec = resolve_fgvc(name)
            except KeyError:
                if (folder / "train.json").is_file():
                    refs.append(TaskRef(name, "custom", folder, ("data.name=fgvc",)))
                    continue
                raise
            reads = ("data.name=fgvc", f"data.options.dataset={spec.name}")
            refs.append(TaskRef(spec.name, "fgvc", data_root / spec.folder, reads))
            continue
        try:
            refs.append(_vtab_ref(resolve_task(name, suite.tasks), data_root))
        except KeyError as err:
            if any((folder / f"{s}.txt").is_file() for s in ("train800", "train800val200")):
                refs.append(TaskRef(name, "custom", folder, ("data.name=vtab",)))
                continue
            raise UnknownNameError(f"{err.args[0]} No folder {folder} with VTAB list files either.") from None
    return refs
