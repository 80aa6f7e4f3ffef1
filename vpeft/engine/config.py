"""The run config: a YAML file with five sections, validated before any work starts.

A file may inherit from others with ``_base_`` (paths relative to the file; dicts merge key by key, lists and
scalars replace), and ``--set dotted.key=value`` overrides go on top (values parsed as YAML)::

    # configs/vtab/cifar100/lora_vit_b16.yaml
    _base_: [../../_base_/vit_b16.yaml, ../_vtab.yaml]
    model: {name: vit_base_patch16_224, pretrained: checkpoints/vit_b16.safetensors}
    method: {name: lora, r: 8, alpha: 8}   # the method's own options sit beside its name
    data: {name: folder, root: data/cifar100, batch_size: 64, augment: fgvc}
    optim: {lr: 1.0e-3, warmup_epochs: 10}
    train: {epochs: 100, amp: bf16}

    python tools/train.py configs/vtab/cifar100/lora_vit_b16.yaml --set optim.lr=5e-4 method.r=16

A top-level ``plugins:`` list adds plug-ins beside the method (``[{name: density_loss, weight: 0.1}]``,
:mod:`vpeft.plugins`); a child file's list replaces its parent's.

A child file (or ``--set``) that names a different ``method.name`` drops the options inherited for the earlier
method; ``optim.name`` likewise drops the earlier optimiser's own options (``rank``...) and keeps the schedule
(``lr``, ``warmup_epochs``...). Every error is a
:class:`ConfigError` naming the dotted key, the file (or ``--set``) it came from, what was expected and, for an
unknown key, the close matches.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..core import build_config
from ..errors import ConfigError, MissingFileError
from ..files import atomic_write
from ..methods import METHODS
from ..optim import OPTIMIZERS, optimizer_options
from ..plugins import build_plugins
from ..registry import lookup
from ..tasks import TASKS

__all__ = ["ConfigError", "RunConfig", "load_config", "dump_config", "config_diff"]

DEFAULT_METHOD = "lora"
DEFAULT_OPTIMIZER = "adamw"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Unit = Annotated[float, Field(ge=0.0, lt=1.0)]
Pair = Annotated[tuple[Unit, Unit], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]  # YAML lists


class ModelConfig(_Section):
    """The backbone (a timm name, or ``family:name`` from ``vpeft.backbones.BACKBONES``) and the task's head.

    ``pretrained`` is a local checkpoint file; ``kwargs`` go to the backbone's builder (``timm.create_model``);
    ``head`` is ``{name: ..., <options>}`` as the task reads it (classification: ``{pool: token|avg|both}``).
    """

    name: str
    pretrained: str | None = None
    strict: bool = True  # false: load what fits and log the rest (a partly random model; ask for it explicitly)
    num_classes: int | None = Field(None, ge=1)
    img_size: int | None = Field(None, ge=1)
    drop_path: Unit = 0.0
    kwargs: dict[str, Any] = {}
    grad_checkpointing: bool = False
    head: dict[str, Any] = {}  # the task's head: `name` and its options (classification: `pool`)


class MethodSection(_Section):
    """The PEFT method: ``name`` plus the method's own options beside it, checked by the method's config class."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = DEFAULT_METHOD

    @property
    def options(self) -> dict[str, Any]:
        """The method options (everything but ``name``), ready for ``apply_method(model, name, **options)``."""
        return dict(self.model_extra or {})

    @pydantic.model_validator(mode="after")
    def _check_options(self) -> MethodSection:
        try:
            cls = lookup(METHODS, self.name, "method")
        except KeyError as err:
            raise PydanticCustomError("method_option", "{message}", {"key": "name", "message": err.args[0]}) from None
        try:
            build_config(cls.Config, self.options, self.name)
        except (TypeError, ValueError) as err:  # an OptionError names its option; another error names the method
            key = getattr(err, "option", "")
            raise PydanticCustomError("method_option", "{message}", {"key": key, "message": str(err)}) from None
        return self


class DataConfig(_Section):
    """The dataset (a name in the data registry), its splits, loaders and augmentation."""

    name: str
    root: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str = "test"
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    num_workers: int = Field(2, ge=0)
    augment: Literal["none", "fgvc", "randaugment"] = "none"
    img_size: int | None = Field(None, ge=1)
    calibration_batches: int = Field(0, ge=0)
    group_by_length: bool = False  # training batches of items of similar length (text tasks): far less padding
    options: dict[str, Any] = {}


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule; ``accumulate`` batches per optimizer step. ``name`` is an optimiser of
    :data:`vpeft.optim.OPTIMIZERS` (``adamw``, ``galore``...), its own options sit beside it (``rank: 128``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = DEFAULT_OPTIMIZER
    lr: float = Field(1e-3, gt=0.0)
    head_lr: float | None = Field(None, gt=0.0)  # the task head's lr (default lr): a probe's rate beside a low one
    weight_decay: float = Field(1e-4, ge=0.0)
    betas: Pair = (0.9, 0.999)
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr: float = Field(1e-8, ge=0.0)
    label_smoothing: Unit = 0.0
    grad_clip: float | None = Field(None, gt=0.0)
    accumulate: int = Field(1, ge=1)

    @property
    def options(self) -> dict[str, Any]:
        """The optimiser's own options (the keys beside ``name`` that are not the fields above)."""
        return dict(self.model_extra or {})

    @pydantic.model_validator(mode="after")
    def _check_options(self) -> OptimConfig:
        try:
            spec = lookup(OPTIMIZERS, self.name, "optimizer")
        except KeyError as err:
            raise PydanticCustomError("optim_option", "{message}", {"key": "name", "message": err.args[0]}) from None
        own = [f.name for f in dataclasses.fields(spec.Config)]
        for key in self.options:
            if key not in own:  # a typo of a schema key (lrr) or an option of another optimiser (rank with adamw)
                valid = [*type(self).model_fields, *own]
                close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr('optim.' + c) for c in close)}?" if close else ""
                extra = f"; {self.name}'s own options: {', '.join(own)}" if own else f" ({self.name} has no options)"
                message = f"unknown key.{hint} Valid keys here: {', '.join(type(self).model_fields)}{extra}."
                raise PydanticCustomError("optim_option", "{message}", {"key": key, "message": message})
        try:
            optimizer_options(self.name, self.options)
        except (TypeError, ValueError) as err:
            key = getattr(err, "option", "")
            raise PydanticCustomError("optim_option", "{message}", {"key": key, "message": str(err)}) from None
        return self


class TrainConfig(_Section):
    """The loop: epochs, evaluation cadence, seed, precision, device and logging."""

    epochs: int = Field(100, ge=1)
    eval_every: int = Field(1, ge=1)
    seed: int = 42
    deterministic: bool = False
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    max_steps: int | None = Field(None, ge=1)
    # under torchrun: ddp (every process holds the model) or fsdp (tensors sharded); see vpeft/engine/distributed.py
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @pydantic.field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError:
                message = f"{value!r} is not a device; use auto (CUDA when there is one), cpu, cuda or cuda:N."
                raise PydanticCustomError("device", "{message}", {"message": message}) from None
        return value


class RunConfig(_Section):
    """A whole run: backbone, method, data, optimizer and loop settings, plus an optional run name."""

    name: str | None = None
    task: str = "classification"
    model: ModelConfig
    method: MethodSection = MethodSection()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    # plug-ins beside the method (vpeft.plugins): [{name: density_loss, weight: 0.1}]; none by default
    plugins: list[Any] = []

    @pydantic.field_validator("plugins")
    @classmethod
    def _known_plugins(cls, value: list[Any]) -> list[Any]:
        try:
            build_plugins(value)
        except (KeyError, TypeError, ValueError) as err:  # an unknown name, a bad option: the message says which
            raise PydanticCustomError("plugins", "{message}", {"message": str(err)}) from None
        return value

    @pydantic.field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        try:
            lookup(TASKS, value, "task")
        except KeyError as err:
            raise PydanticCustomError("task", "{message}", {"message": err.args[0]}) from None
        return value


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

Origins = dict[tuple[str, ...], str]


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None


def _layers(path: Path, stack: tuple[Path, ...], used_by: Path | None) -> list[tuple[dict, str]]:
    """``(data, source)`` for ``path``'s bases (depth first, in order) and then ``path`` itself."""
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack[stack.index(path) :], path))
        raise ConfigError(f"_base_ cycle: {cycle}")
    if not path.is_file():
        extra = f" (a _base_ of {used_by})" if used_by else ""
        raise MissingFileError(f"config file not found: {path}{extra}")
    data = _parse(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    out: list[tuple[dict, str]] = []
    for base in bases:
        out += _layers(path.parent / base, (*stack, path), path)
    return [*out, (data, str(path))]


def _record(origins: Origins, path: tuple[str, ...], value: Any, source: str) -> None:
    for key in [k for k in origins if k[: len(path)] == path]:
        del origins[key]
    origins[path] = source
    if isinstance(value, dict):
        for key, item in value.items():
            _record(origins, (*path, str(key)), item, source)


def _merge(base: dict, layer: dict, origins: Origins, source: str, switch_drops: bool, prefix=()) -> dict:
    """Deep-merge ``layer`` over ``base`` (dicts key by key, anything else replaces), tracking each key's source."""
    out = dict(base)
    for key, value in layer.items():
        path = (*prefix, str(key))
        old = out.get(key)
        if path == ("method",) and switch_drops and isinstance(value, dict) and isinstance(old, dict):
            if value.get("name", old.get("name", DEFAULT_METHOD)) != old.get("name", DEFAULT_METHOD):
                old = {}  # a different method: the earlier method's options do not apply
                _record(origins, path, old, source)
        if path == ("optim",) and switch_drops and isinstance(value, dict) and isinstance(old, dict):
            if value.get("name", old.get("name", DEFAULT_OPTIMIZER)) != old.get("name", DEFAULT_OPTIMIZER):
                # a different optimiser: the earlier one's options do not apply, the schedule's keys stay
                old = {k: v for k, v in old.items() if k in OptimConfig.model_fields and k != "name"}
                _record(origins, path, old, source)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value, origins, source, switch_drops, path)
        else:
            out[key] = copy.deepcopy(value)
            _record(origins, path, value, source)
    return out


def _walk(path: tuple[str, ...], item: str | None = None) -> tuple[type[BaseModel] | None, Any]:
    """The model holding ``path``'s deepest schema key and that key's annotation; for a ``--set item``, raise on a
    key outside the schema (method options and free-form dicts take any key; the method names a bad option)."""
    model: Any = RunConfig
    holder = ann = None
    for i, part in enumerate(path):
        if (model is MethodSection and part != "name") or typing.get_origin(model) is dict:
            break
        if model is OptimConfig and part not in model.model_fields:  # an optimiser's option: it names a bad one
            break
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            if item:
                raise ConfigError(f"--set {item}: {'.'.join(path[:i])!r} is a value, not a section")
            break
        if item and part not in model.model_fields:
            raise ConfigError(f"{'.'.join(path[: i + 1])} (in --set {item}): {_unknown_key(path[: i + 1], model)}")
        holder, ann = model, model.model_fields[part].annotation if part in model.model_fields else None
        model = _unwrap(ann)
    return holder, ann


def _unwrap(ann: Any) -> Any:
    """The model class inside ``X`` or ``X | None``; otherwise ``ann`` itself."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    return args[0] if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel) else ann


def _type_name(ann: Any) -> str:
    """``float``, ``int | None``, ``tuple[float, float]``: the annotation without ``typing.`` and constraints."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if not args:
        return "None" if ann is type(None) else getattr(ann, "__name__", str(ann).replace("typing.", ""))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(_type_name, args))}]"


def _unknown_key(path: tuple[str, ...], holder: type[BaseModel]) -> str:
    valid = list(holder.model_fields)
    close = difflib.get_close_matches(path[-1], valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr('.'.join((*path[:-1], c))) for c in close)}?" if close else ""
    return f"unknown key.{hint} Valid keys here: {', '.join(valid)}."


def _describe(error: dict[str, Any], origins: Origins, top: str) -> str:
    loc = tuple(str(p) for p in error["loc"])
    if error["type"] in ("method_option", "optim_option"):
        section = error["type"].split("_")[0]
        loc = (section, error["ctx"]["key"]) if error["ctx"]["key"] else (section,)
    source = next((origins[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in origins), top)
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        holder, _ = _walk(loc)
        return f"{dotted} (in {source}): {_unknown_key(loc, holder) if holder else 'unknown key.'}"
    if error["type"] == "missing":
        return f"{dotted}: required key missing (config {top})"
    if error["type"] in (
        "method_option",
        "optim_option",
        "task",
        "device",
        "plugins",
    ):  # messages naming the value and valid ones
        return f"{dotted} (in {source}): {error['ctx']['message']}"
    _, ann = _walk(loc)
    expected = f" (expected {_type_name(ann)})" if ann is not None and error["type"].endswith("_type") else ""
    return f"{dotted} (in {source}): {error['msg']}{expected}, got {error['input']!r}"


def _override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, text = item.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    _walk(path, item)
    return path, _parse(text, f"--set {item}")


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config with its ``_base_`` files, apply ``--set`` overrides and validate the result.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``5e-4``, ``true``, ``[1, 2]``, ``null``).

    Raises:
        FileNotFoundError: ``path`` or one of its bases does not exist.
        ConfigError: invalid YAML, a ``_base_`` cycle, an unknown key, a wrong type or value.
    """
    origins: Origins = {}
    merged: dict[str, Any] = {}
    for data, source in _layers(Path(path), (), None):
        merged = _merge(merged, data, origins, source, switch_drops=True)
    # a method (optimiser) switch comes first and drops the files' method (optimiser) options; options given with
    # --set then apply to it
    for item in sorted(overrides, key=lambda item: not item.startswith(("method.name=", "optim.name="))):
        keys, value = _override(item)
        for key in reversed(keys):
            value = {key: value}
        merged = _merge(merged, value, origins, f"--set {item}", switch_drops=True)
    try:
        return RunConfig.model_validate(merged)
    except pydantic.ValidationError as err:
        problems = [_describe(e, origins, str(path)) for e in err.errors(include_url=False)]
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON types (tuples become lists, method options sit beside ``name``)."""
    return _plain(cfg.model_dump())


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the fully resolved config to ``path`` atomically; ``load_config(path)`` gives an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Sorted dotted keys whose values differ between ``a`` and ``b`` (a key present in one only counts)."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    missing = object()
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, missing) != fb.get(k, missing))
