"""The fields every method config shares, and the one place where options are validated.

Each method declares a ``@dataclass`` subclass of :class:`MethodConfig` whose defaults are its paper's VTAB-1k
setting. Options arrive as keyword arguments (from Python, YAML or a saved ``adapter_config.json``) and are checked
field by field with pydantic in strict mode, so ``r="8"`` is refused rather than coerced.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic

C = TypeVar("C", bound="MethodConfig")


@dataclass
class MethodConfig:
    """Target selection, shared by every method.

    Attributes:
        targets: where the method attaches. Each entry is a role (``q``, ``v``, ``mlp``..., see
            :mod:`vpeft.core.roles`), a dotted module-name suffix (``attn.qkv``) or a full-match regex; a trailing
            ``[q,v]`` adapts only those slices of a fused projection (``attn.qkv[q,v]``).
        exclude: patterns (same syntax) of modules never adapted; excludes win over targets.
        layers: block indices to adapt (the first integer in a module path); ``None`` means all.
        target_types: class names (``Linear``, ``Conv2d``...) to select by type; with empty ``targets`` every
            module of these types is a target, otherwise the two filters are intersected.
        head: module names trained as this adapter's own head (a per-adapter copy); ``None`` finds the model's
            classifier (timm ``get_classifier()``, Hugging Face ``classifier``/``score``), ``()`` means no head.
    """

    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    target_types: tuple[str, ...] = ()
    head: tuple[str, ...] | None = None


def _as_tuples(value: Any) -> Any:
    """JSON and YAML give lists where configs hold tuples (tuples keep configs hashable and immutable)."""
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def build_config(config_cls: type[C], options: dict[str, Any], method: str) -> C:
    """Build ``config_cls(**options)``, naming the method, the bad key and the valid ones on any error."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"method {method!r} has no option {key!r}.{hint} Valid options: {', '.join(names)}.")
        value = _as_tuples(value)
        if isinstance(value, str) and _admits_str_tuple(hints[key]):
            value = (value,)  # targets="attn.qkv" means targets=("attn.qkv",)
        try:
            checked[key] = pydantic.TypeAdapter(hints[key]).validate_python(value, strict=True)
        except pydantic.ValidationError as err:
            problems = "; ".join(
                f"{'/'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise TypeError(
                f"method {method!r} option {key!r} must be {_type_name(hints[key])}, got {value!r} ({problems})."
            ) from None
    config = config_cls(**checked)
    if hasattr(config, "check"):
        config.check()  # value constraints a type cannot express (r > 0, ...)
    return config


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)


def _admits_str_tuple(tp: Any) -> bool:
    return tp == tuple[str, ...] or tuple[str, ...] in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__
