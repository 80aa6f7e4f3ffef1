"""The fields every method config shares, the option types with their constraints, and the one place where options
are validated.

Each method declares a ``@dataclass`` subclass of :class:`MethodConfig` whose defaults are its paper's VTAB-1k
setting. Options arrive as keyword arguments (from Python, YAML or a saved ``adapter_config.json``) and are checked
field by field with pydantic in strict mode, so ``r="8"`` is refused rather than coerced. Range constraints live in
the field types (:data:`PositiveInt`, :data:`DropProbability`, ``Literal[...]`` for choices...), declared here once;
a config's ``check()`` holds only rules across several fields. A rank option (:data:`Rank`) is also checked against
the shapes of the targets by :func:`check_ranks` before the adapter is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from annotated_types import Ge, Gt, Le, Lt

from ..errors import OptionError, OptionTypeError
from .modules import Target

C = TypeVar("C", bound="MethodConfig")
log = logging.getLogger("vpeft")


@dataclass(frozen=True)
class RankLimit:
    """Marks an option that is the rank of an update of each target's ``(out, in)`` weight. Above ``min(out, in)``
    the update is no longer low rank: it is refused, or with ``refuse=False`` (a method whose reference setting goes
    above on narrow layers) accepted with one warning."""

    refuse: bool = True


_FINITE = pydantic.AllowInfNan(False)
PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
DropProbability = Annotated[float, Ge(0.0), Lt(1.0)]  # dropout, drop path: 1 would drop everything
ProperFraction = Annotated[float, Gt(0.0), Lt(1.0)]  # a share of something, neither none nor all of it
PositiveFloat = Annotated[float, Gt(0.0), _FINITE]
NonNegativeFloat = Annotated[float, Ge(0.0), _FINITE]
FiniteFloat = Annotated[float, _FINITE]
Rank = Annotated[int, Ge(1), RankLimit()]
LenientRank = Annotated[int, Ge(1), RankLimit(refuse=False)]

# pydantic error types that mean "the right type, a value outside what the field allows"
_VALUE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "literal_error"}


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


def build_config(config_cls: type[C], options: dict[str, Any], method: str, kind: str = "method") -> C:
    """Build ``config_cls(**options)``; an unknown option, a wrong type or a value outside the field's constraints
    raises :class:`~vpeft.errors.OptionTypeError` or :class:`~vpeft.errors.OptionError` naming the method, the option
    (also as ``error.option``), the value and what is allowed. ``kind`` is what the messages call the owner of the
    options (``optimizer`` for :mod:`vpeft.optim`'s)."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(config_cls)]
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise OptionTypeError(
                f"{kind} {method!r} has no option {key!r}.{hint} Valid options: {', '.join(names)}.", key
            )
        value = _as_tuples(value)
        if isinstance(value, str) and _admits_str_tuple(hints[key]):
            value = (value,)  # targets="attn.qkv" means targets=("attn.qkv",)
        try:
            checked[key] = pydantic.TypeAdapter(hints[key]).validate_python(value, strict=True)
        except pydantic.ValidationError as err:
            raise _option_error(method, key, value, hints[key], err.errors(include_url=False), kind) from None
    config = config_cls(**checked)
    if hasattr(config, "check"):
        config.check()  # rules across several fields (groups divides dim, ...)
    return config


def _option_error(method: str, key: str, value: Any, hint: Any, errors: list[dict], kind: str) -> OptionError:
    if all(e["type"] in _VALUE_ERRORS for e in errors):
        first = errors[0]
        where = key + "".join(f"[{i}]" for i in first["loc"])  # grid[0], plan[2][1]
        allowed = _allowed(_inner(hint, first["loc"]))
        return OptionError(f"{method} option {where} must be {allowed}, got {first['input']!r}.", key)
    problems = "; ".join(f"{'/'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors)
    return OptionTypeError(
        f"{kind} {method!r} option {key!r} must be {_type_name(hint)}, got {value!r} ({problems}).", key
    )


def option_types(config_cls: type[MethodConfig]) -> dict[str, tuple[str, str]]:
    """Each option's type and, in words, the values it admits beyond the type (``""`` when the type says it all):
    ``{"r": ("int", ">= 1, at most min(out, in) of each target"), "dropout": ("float", "in [0, 1)"), ...}``."""
    hints = typing.get_type_hints(config_cls, include_extras=True)
    out = {}
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        name, allowed = _type_name(hint), _allowed(hint)
        if _rank_limit(hint) is not None:
            allowed += ", at most min(out, in) of each target"
        out[field.name] = (name, "" if allowed.replace(" or ", " | ") == name else allowed)
    return out


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return dataclasses.asdict(config)


def check_ranks(config: MethodConfig, targets: Sequence[Target], method: str, warn: bool = True) -> None:
    """Refuse a :data:`Rank` option above ``min(out, in)`` of a target's weight (warn once for a
    :data:`LenientRank`, unless ``warn`` is False), naming the option, the narrowest target, its shape and the
    largest rank that fits.

    Only targets with a weight matrix count (Linear, Conv2d as ``(out, in * kh * kw)``, attention projections);
    norms, whole blocks and grouped convolutions have no one rank."""
    shapes = [(t, shape) for t in targets if (shape := _matrix_shape(t)) is not None]
    if not shapes:
        return
    target, (rows, cols) = min(shapes, key=lambda item: min(item[1]))
    largest = min(rows, cols)
    for name, hint in typing.get_type_hints(type(config), include_extras=True).items():
        limit, rank = _rank_limit(hint), getattr(config, name)
        if limit is None or rank is None or rank <= largest:
            continue
        text = (
            f"{method} option {name}={rank} exceeds the rank of target {target.key!r}, whose weight is {rows} x {cols}"
            f" (out x in): above min(out, in) = {largest} the update is no longer low rank."
        )
        if limit.refuse:
            raise OptionError(f"{text} Use {name} <= {largest}.", name)
        if warn:
            log.warning("vpeft: %s The method's reference setting allows it; it trains as given.", text)


def _matrix_shape(target: Target) -> tuple[int, int] | None:
    """The target's weight as the matrix an update of it is, ``(out, in)``; None where there is no such matrix."""
    if target.kind == "conv2d":
        if target.module.groups != 1:  # one block per group, not one matrix (LoRA refuses it itself)
            return None
        weight = target.module.weight  # (out, in, kh, kw)
        return weight.shape[0], weight[0].numel()
    if target.kind in ("linear", "mha"):
        return target.out_features, target.in_features
    return None


def _rank_limit(hint: Any) -> RankLimit | None:
    if typing.get_origin(hint) is Annotated:
        return next((m for m in typing.get_args(hint)[1:] if isinstance(m, RankLimit)), None)
    return next(filter(None, map(_rank_limit, typing.get_args(hint))), None)  # inside ``Rank | None``


def _admits_str_tuple(tp: Any) -> bool:
    return tp == tuple[str, ...] or tuple[str, ...] in typing.get_args(tp)


def _inner(hint: Any, loc: tuple) -> Any:
    """The annotation of the part of a value at pydantic's error location ``loc`` (indices into tuples)."""
    for index in loc:
        hint = _without_none(_strip(hint))
        args = typing.get_args(hint)
        if typing.get_origin(hint) is not tuple or not isinstance(index, int):
            return hint
        hint = args[0] if args[-1] is Ellipsis else args[index]
    return hint


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None``; any other annotation as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return _strip(args[0]) if union and len(args) == 1 else hint


def _strip(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _allowed(hint: Any) -> str:
    """What a field admits, in words: ``>= 1``, ``in [0, 1)``, ``a finite number > 0``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _bounds(args[1:]) or _allowed(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(a) for a in args)
    return _type_name(hint)


def _bounds(metadata: Sequence[Any]) -> str:
    def number(bound: Any, attr: str) -> str:
        return f"{getattr(bound, attr):g}"

    low = next((m for m in metadata if isinstance(m, (Ge, Gt))), None)
    high = next((m for m in metadata if isinstance(m, (Le, Lt))), None)
    if low is not None and high is not None:
        left = f"[{number(low, 'ge')}" if isinstance(low, Ge) else f"({number(low, 'gt')}"
        right = f"{number(high, 'le')}]" if isinstance(high, Le) else f"{number(high, 'lt')})"
        text = f"in {left}, {right}"
    elif low is not None:
        text = f">= {number(low, 'ge')}" if isinstance(low, Ge) else f"> {number(low, 'gt')}"
    elif high is not None:
        text = f"<= {number(high, 'le')}" if isinstance(high, Le) else f"< {number(high, 'lt')}"
    else:
        text = ""
    finite = any(isinstance(m, pydantic.AllowInfNan) and not m.allow_inf_nan for m in metadata)
    return f"a finite number {text}".rstrip() if finite else text


def _type_name(hint: Any) -> str:
    """``int``, ``float | None``, ``tuple[int, int]``: the annotation without ``typing.`` and constraints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(map(repr, args))
    if not args:
        return "None" if hint is type(None) else "..." if hint is Ellipsis else getattr(hint, "__name__", str(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(_type_name, args))}]"
