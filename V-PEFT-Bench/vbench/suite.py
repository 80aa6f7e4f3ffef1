"""Suites: which tasks, which recipe, which seeds and grids; read from ``configs/bench/<suite>.yaml``.

A suite file (paths relative to it) names its tasks in one of two ways. A task table of ``vpeft.data`` (VTAB-1k,
MiniVTAB, FGVC: image folders under one data root, one recipe for all)::

    recipe: ../_base_/vtab1k.yaml          # the run config every run starts from (tools/train.py format)
    tasks: vtab1k                          # a task table: vtab1k | minivtab (vpeft.data.vtab) | fgvc
    data_root: data/vtab-1k                # one folder per task below it

or the tasks themselves, each with its own recipe (a task whose data a reader builds, such as the text tasks)::

    tasks:
      wordnet16: {recipe: recipes/lm_wordnet16.yaml, metric: accuracy, set: [data.batch_size=32]}
      lemmas: {recipe: recipes/lm_lemmas.yaml, metric: exact_match, method_set: {dora: [method.r=4]}}

A written-out task may score each trained adapter again under edits of its saved config (``evals``, each a column
of the tables beside the task's own score) and add harmonic means of its own score and an eval's (``harmonic``)::

      base:                                # CLIP base-to-novel (configs/bench/clip_scenes.yaml)
        recipe: ../clip/_scenes_b2n.yaml
        evals: {novel: [data.options.classes=novel], held_out: [data.options.classes=held_out]}
        harmonic: {HM: novel}
        also_as: {16-shot: k_shot}         # its own score, again, as a column of the group k_shot

and then, for both::

    seeds: [42, 44, 82, 100, 800]          # --seeds N runs the first N
    set: [model.pretrained=checkpoints/ViT-B_16.npz]      # overrides for every run
    method_set: {spt_lora: [method.param_budget=0.012]}   # overrides for one method (or variant: lora:r=16)
    baselines:                             # reference rows run with every sweep, each on its tasks
      frozen_0shot: {method: frozen, tasks: [lemmas], tune: false, seeds: 1}
      frozen_3shot: {method: frozen, tasks: [lemmas], set: [data.options.shots=3], tune: false}
    check: {method: lora, sigmas: 3}       # the leaderboard says per task whether lora beats the best baseline
    variants: {lora_image: {method: lora, set: [model.head.adapt=image]}}   # --methods names of method settings
    seed_keys: [data.options.seed]         # keys that take each run's seed too (a few-shot sampler's draw)
    means: false                           # no group or overall means: a table per group (columns, not tasks)
    published: {file: clip_base_to_novel.csv, note: "..."}   # V-PEFT-Bench/published, printed beside ours
    protocols:
      standard: {tune: [train800, val200], final: [train800val200, test], grid: {optim.lr: [1.0e-3, 5.0e-3]}}
      literature: {final: [train800val200, test], eval_every: 1}
      quick: {final: [train800val200, test]}

:func:`resolve_tasks` turns task names (canonical or aliases) into :class:`TaskRef` objects holding what one task's
runs need: its recipe and the overrides that read its data. In a table suite, a folder the table does not know
(``--data-root DIR --tasks NAME``) becomes a ``custom`` task whose class count the dataset reads from its lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpeft.data.fgvc import FGVC, resolve_fgvc
from vpeft.data.vtab import SUITES, VtabTask, resolve_task, task_folder
from vpeft.errors import ConfigError, MissingFileError, UnknownNameError
from vpeft.registry import lookup

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


class SuiteTask(_Strict):
    """A task written out in the suite: its recipe, its group in the tables, its metric and its own overrides."""

    recipe: str
    group: str = "tasks"
    metric: str = "top1"  # the task's main metric (Task.metric): labels and file names of the leaderboard
    set: list[str] = []
    method_set: dict[str, list[str]] = {}  # overrides for one method on this task (after the suite's method_set)
    # more scores of each trained adapter: name -> edits of its saved config, scored on the test split again (CLIP
    # base-to-novel: {novel: [data.options.classes=novel]}); each is a column of its own, in the task's group
    evals: dict[str, list[str]] = {}
    # columns that are the harmonic mean of the task's own score and one of its evals, per seed ({HM: novel})
    harmonic: dict[str, str] = {}
    # the task's own score shown again as another column of another group ({16-shot: k_shot}: the base-to-novel
    # task's base score is also the 16-shot point of the k-shot curve, from the same runs)
    also_as: dict[str, str] = {}

    def columns(self, name: str) -> list[tuple[str, str]]:
        """The task's ``(column, group)`` in its group: its own score, then each eval followed by its harmonic
        means (its ``also_as`` columns come after every task's, at the end of their groups)."""
        own = [name, *(c for e in self.evals for c in (e, *(h for h, of in self.harmonic.items() if of == e)))]
        return [(c, self.group) for c in own]


class Variant(_Strict):
    """A named way to run a method (``--methods lora_both``): ``method`` with ``set``; options after colons
    (``lora_both:r=2``) come after ``set``."""

    method: str
    set: list[str] = []


class Published(_Strict):
    """Published numbers to print beside ours: ``file`` in ``V-PEFT-Bench/published`` (a ``method`` column, the
    suite's column names, ``vpeft_method``: our row's label, ``source``) and what the reader must know (``note``)."""

    file: str
    note: str


class Baseline(_Strict):
    """A reference row: ``method`` (default: the row's name) with ``set`` on ``tasks`` (default: all); ``tune:
    false`` runs the recipe's hyperparameters (nothing to tune when nothing trains); ``seeds: 1`` runs only the first
    seed of a sweep (a row that no seed changes, such as zero-shot prompting)."""

    method: str | None = None
    tasks: list[str] | None = None
    set: list[str] = []
    tune: bool = True
    seeds: int | None = Field(None, ge=1)


class Check(_Strict):
    """The leaderboard's verdict: does ``method`` beat every task's best baseline by more than ``sigmas`` standard
    errors of the difference?"""

    method: str
    sigmas: float = Field(3.0, gt=0)


class Suite(_Strict):
    """One suite file, validated; ``path`` is where it came from (relative paths resolve against its folder)."""

    name: str = ""
    path: Path = Path()
    recipe: str | None = None  # a table suite's recipe; written-out tasks carry their own
    tasks: str | dict[str, SuiteTask]
    data_root: str | None = None
    build: str | None = None  # a script that builds the data when data_root is missing (MiniVTAB)
    seeds: list[int] = Field(min_length=1)
    set: list[str] = []
    seed_keys: list[str] = []  # keys set to each run's seed besides train.seed (the few-shot sampler's seed)
    method_set: dict[str, list[str]] = {}
    variants: dict[str, Variant] = {}
    baselines: dict[str, Baseline] = {}
    check: Check | None = None
    caption: str | None = None  # what the leaderboard's numbers are (default: the VTAB wording)
    means: bool = True  # false: no group or overall means (columns that are not tasks to average), a table per group
    published: Published | None = None  # a written-out suite's published numbers (a table suite: <tasks>.csv)
    protocols: dict[str, Protocol]

    def recipe_path(self, recipe: str | None = None) -> Path:
        return (self.path.parent / (recipe or self.recipe)).resolve()

    def default_root(self) -> Path | None:
        if self.data_root is None:
            return None
        return ROOT / self.data_root if not Path(self.data_root).is_absolute() else Path(self.data_root)

    def protocol(self, name: str) -> Protocol:
        """The splits and grid of protocol ``name``; an error naming the protocols this suite defines."""
        if name not in self.protocols:
            raise ConfigError(f"--protocol {name}: suite {self.name!r} ({self.path}) defines "
                              f"{', '.join(self.protocols)}")  # fmt: skip
        return self.protocols[name]

    def task_table(self) -> list[tuple[str, str]]:
        """``(column, group)`` of every column of the suite's tables in order: each task followed by its evals and
        harmonic means (a written-out task's ``columns``), then the tasks' ``also_as`` columns."""
        if isinstance(self.tasks, dict):
            own = [column for name, task in self.tasks.items() for column in task.columns(name)]
            return own + [column for task in self.tasks.values() for column in task.also_as.items()]
        if self.tasks == "fgvc":
            return [(name, "fgvc") for name in FGVC]
        return [(t.name, t.group) for t in SUITES[self.tasks].values()]

    def metric_label(self) -> str:
        """The tasks' metrics as an axis label: ``top-1`` for the image tables, ``accuracy / exact_match`` for text."""
        if not isinstance(self.tasks, dict):
            return "top-1"
        return " / ".join(dict.fromkeys(t.metric for t in self.tasks.values()))

    def metric(self) -> str:
        """The tasks' metric, or ``score`` when they differ (accuracy on some, exact match on others)."""
        names = {t.metric for t in self.tasks.values()} if isinstance(self.tasks, dict) else {"top1"}
        return names.pop() if len(names) == 1 else "score"


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
    if isinstance(suite.tasks, str):
        if suite.tasks not in TABLES:
            raise ConfigError(f"suite file {path}: tasks {suite.tasks!r} is not one of {', '.join(TABLES)}")
        missing = [key for key in ("recipe", "data_root") if getattr(suite, key) is None]
        if missing:
            raise ConfigError(f"suite file {path}: the task table {suite.tasks!r} needs {' and '.join(missing)}")
    else:
        if not suite.tasks:
            raise ConfigError(f"suite file {path}: tasks is empty; name at least one task with its recipe")
        for name, task in suite.tasks.items():
            if not suite.recipe_path(task.recipe).is_file():
                raise MissingFileError(f"suite file {path}: tasks.{name}.recipe {suite.recipe_path(task.recipe)} "
                                       "does not exist")  # fmt: skip
    if isinstance(suite.tasks, dict):
        _check_columns(suite, path)
    if suite.published is not None and not (ROOT / "V-PEFT-Bench" / "published" / suite.published.file).is_file():
        raise MissingFileError(f"suite file {path}: published.file {suite.published.file!r} is not a file in "
                               f"{ROOT / 'V-PEFT-Bench' / 'published'}; name one of the CSV files there")  # fmt: skip
    known = list(suite.tasks) if isinstance(suite.tasks, dict) else [t for t, _ in suite.task_table()]
    for name, baseline in suite.baselines.items():
        unknown = [t for t in baseline.tasks or () if t not in known]
        if unknown:
            raise ConfigError(f"suite file {path}: baselines.{name}.tasks {unknown} are not tasks of the suite "
                              f"({', '.join(known)})")  # fmt: skip
    return suite


def _check_columns(suite: Suite, path: Path) -> None:
    """Every column name once (an eval named like a task would mix two scores in one cell), harmonic means of evals
    the task has."""
    seen: dict[str, str] = {}
    for name, task in suite.tasks.items():
        for column, of in task.harmonic.items():
            if of not in task.evals:
                evals = ", ".join(task.evals) or "none"
                raise ConfigError(f"suite file {path}: tasks.{name}.harmonic.{column} is the harmonic mean with "
                                  f"{of!r}, which is not one of the task's evals ({evals})")  # fmt: skip
        for column, _ in [*task.columns(name), *task.also_as.items()]:
            if column in seen:
                raise ConfigError(f"suite file {path}: column {column!r} of task {name!r} is also a column of task "
                                  f"{seen[column]!r}; give evals and harmonic means names of their own")  # fmt: skip
            seen[column] = name


@dataclass(frozen=True)
class TaskRef:
    """One task as the harness runs it: name, group, data folder (None: the recipe's reader finds its data), the
    run-config overrides that read it and the recipe its runs start from."""

    name: str
    group: str
    root: Path | None
    overrides: tuple[str, ...] = field(default=())
    recipe: Path | None = None
    method_set: dict[str, list[str]] = field(default_factory=dict)
    evals: dict[str, list[str]] = field(default_factory=dict)  # name -> config edits, scored after training


def _vtab_ref(task: VtabTask, data_root: Path) -> TaskRef:
    try:
        folder = task_folder(data_root, task)
    except FileNotFoundError:
        folder = data_root / task.name  # reported when the run starts, as that run's failure
    return TaskRef(task.name, task.group, folder, ("data.name=vtab", f"data.options.task={task.name}"))


def resolve_tasks(suite: Suite, names: list[str] | None, data_root: Path | None) -> list[TaskRef]:
    """The tasks to run: the suite's (``names`` None) or the named ones, canonical or alias.

    In a table suite, a name the tables do not know but that is a folder under ``data_root`` holding ``train800.txt``
    or ``train.json`` runs as a ``custom`` task (VTAB layout or FGVC json layout); anything else raises naming the
    known tasks. Every task gets its recipe: its own in a suite that writes its tasks out, the suite's otherwise.
    """
    if isinstance(suite.tasks, dict):
        if data_root is not None:
            raise ConfigError(f"--data-root {data_root}: the tasks of suite {suite.name!r} read their data as their "
                              "recipes say; set a task's data keys with --set instead")  # fmt: skip
        refs = []
        for name in names or list(suite.tasks):
            task = lookup(suite.tasks, name, f"task of suite {suite.name!r}")
            recipe = suite.recipe_path(task.recipe)
            refs.append(TaskRef(name, task.group, None, tuple(task.set), recipe, task.method_set, task.evals))
        return refs
    return [replace(ref, recipe=suite.recipe_path()) for ref in _table_tasks(suite, names, data_root)]


def _table_tasks(suite: Suite, names: list[str] | None, data_root: Path) -> list[TaskRef]:
    refs = []
    for name in names or [t for t, _ in suite.task_table()]:
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
