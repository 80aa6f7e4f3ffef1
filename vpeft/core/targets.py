"""Which modules a method adapts: name patterns, roles, types and block indices, with excludes winning.

A pattern matches a module path when it equals it, is a dotted suffix of it (``attn.qkv`` matches
``blocks.3.attn.qkv``), or full-matches it as a regular expression. ``pattern[q,v]`` selects slices of a fused
projection (a Linear or HF Conv1D whose output is ``[q; k; v]``, or ``nn.MultiheadAttention``). Paths are *logical*:
the ``base_layer`` that a wrapper inserts is left out, so adapters stack without renaming anything.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator

from torch import nn

from ..errors import ConfigError
from .config import MethodConfig
from .layers import Adapted, AdapterModule
from .modules import WHOLE, Target, fused_parts, kind_of
from .roles import ROLES

SHARED = "vpeft_shared"  # root attribute holding tensors shared by all targets of an adapter
_SLICE = re.compile(r"^(?P<pattern>.+)\[(?P<parts>[\w\s,]+)\]$")


def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(logical path, base module)`` for every module, seeing through wrappers and skipping adapter tensors."""

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            if name == SHARED and prefix == "":
                continue
            path = f"{prefix}.{name}" if prefix else name
            base = child.base_layer if isinstance(child, Adapted) else child
            yield path, base
            yield from visit(base, path)

    yield from visit(model, "")


def block_index(path: str) -> int | None:
    for piece in path.split("."):
        if piece.isdigit():
            return int(piece)
    return None


def name_matches(path: str, pattern: str) -> bool:
    if path == pattern or path.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def _split(pattern: str) -> tuple[str, tuple[str, ...] | None]:
    m = _SLICE.match(pattern)
    if m is None:
        return pattern, None
    return m["pattern"], tuple(p.strip() for p in m["parts"].split(",") if p.strip())


def _check_regex(pattern: str) -> None:
    if not re.fullmatch(r"[\w.]+", pattern):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"target pattern {pattern!r} is not a valid regular expression: {err}") from None


def find_heads(model: nn.Module, config: MethodConfig) -> list[str]:
    """Logical paths of the task head: the ``head`` option, else the classifier the model reports."""
    modules = dict(walk(model))
    if config.head is not None:
        names = []
        for pattern in config.head:
            hits = [p for p in modules if name_matches(p, pattern)]
            if not hits:
                raise ConfigError(_no_match(f"head pattern {pattern!r}", modules))
            names += [h for h in hits if h not in names and not any(h.startswith(n + ".") for n in names)]
        return names
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, Adapted):  # a head another adapter already copies
        classifier = classifier.base_layer
    for path, module in modules.items():
        if classifier is not None and module is classifier and not isinstance(module, nn.Identity):
            return [path]
        if classifier is None and path in ("classifier", "score"):
            return [path]
    return []


def select_targets(model: nn.Module, config: MethodConfig, method: type[AdapterModule], name: str) -> list[Target]:
    """Resolve ``config`` against ``model`` into targets; every pattern must match, or the error lists candidates."""
    modules = dict(walk(model))
    heads = find_heads(model, config)
    in_head = lambda p: any(p == h or p.startswith(h + ".") for h in heads)  # noqa: E731
    chosen: dict[tuple[str, str], None] = {}  # ordered set of (path, part)
    passed_over: dict[str, str] = {}  # path -> why a match is no target: its kind, or the method's accepts()

    def add(path: str, parts: tuple[str, ...] | None, source: str, strict: bool) -> bool:
        module = modules[path]
        kind = kind_of(module)
        if "module" not in method.wraps and kind not in method.wraps:
            if strict:
                raise ConfigError(
                    f"{source} matched {path!r} ({type(module).__name__}), but {name!r} adapts only "
                    f"{', '.join(method.wraps)} modules."
                )
            passed_over[path] = "kind"
            return False
        if kind == "mha" and parts is None and strict and "mha" in method.wraps:
            raise ConfigError(
                f"{source} matched nn.MultiheadAttention {path!r}: name its projections, "
                f"e.g. '{path}[q,v]' or '{path}.out_proj'."
            )
        if parts is not None:
            available = fused_parts(module)
            bad = [p for p in parts if p not in available]
            if bad:
                if strict:
                    raise ConfigError(
                        f"{source}: {path!r} ({type(module).__name__}) has no slice {bad[0]!r}; "
                        + (f"its slices are {list(available)}." if available else "it is not a fused projection.")
                    )
                return False
        if not method.accepts(_target(path, module, parts[0] if parts else WHOLE), config):
            passed_over[path] = "accepts"
            return False
        for part in parts or (WHOLE,):
            chosen[(path, part)] = None
        return True

    typed = [p for p, m in modules.items() if type(m).__name__ in config.target_types and not in_head(p)]
    if config.target_types and not typed:
        raise ConfigError(
            f"target_types {list(config.target_types)} match no module; types in the model: "
            f"{sorted({type(m).__name__ for m in modules.values()})}."
        )
    for entry in config.targets:
        strict = entry not in ROLES
        hit = False
        for pattern in ROLES.get(entry, (entry,)):
            base, parts = _split(pattern)
            _check_regex(base)
            candidates = (p for p in (typed or modules) if not isinstance(modules[p], nn.Identity))
            for path in (p for p in candidates if name_matches(p, base) and not in_head(p)):
                if _is_mha_out_proj(path, modules):  # adapted through its nn.MultiheadAttention parent
                    hit |= add(path.rsplit(".", 1)[0], ("out_proj",), f"target {entry!r}", strict)
                else:
                    hit |= add(path, parts, f"target {entry!r}", strict)
        if not hit:
            what = f"role {entry!r} (conventions: {', '.join(ROLES[entry])})" if entry in ROLES else f"{entry!r}"
            raise ConfigError(_no_match(f"target {what}", modules))
    if config.target_types and not config.targets:
        for path in typed:
            add(path, None, "target_types", strict=False)

    if chosen:  # the filters below took every target away, not the method: say so
        passed_over.clear()
    for pattern in config.exclude:
        base, parts = _split(pattern)
        _check_regex(base)
        dropped = [k for k in chosen if name_matches(k[0], base) and (parts is None or k[1] in parts)]
        if not any(name_matches(p, base) for p in modules):
            raise ConfigError(_no_match(f"exclude pattern {pattern!r}", modules))
        for k in dropped:
            del chosen[k]
    if config.layers is not None:
        present = {block_index(p) for p, _ in chosen} - {None}
        missing = sorted(set(config.layers) - present)
        if missing:
            raise ConfigError(f"layers {missing} hold no target; the targets sit in blocks {sorted(present)}.")
        chosen = {k: None for k in chosen if block_index(k[0]) in set(config.layers)}

    if not chosen and method.needs_targets:
        raise ConfigError(_nothing_taken(model, method, name, passed_over, modules))
    targets = [_target(path, modules[path], part) for path, part in chosen]
    for i, t in enumerate(targets):
        t.position, t.count = i, len(targets)
    return targets


def _target(path: str, module: nn.Module, part: str) -> Target:
    return Target(path, module, part, kind_of(module), block_index(path))


def _nothing_taken(
    model: nn.Module, method: type[AdapterModule], name: str, passed_over: dict[str, str], modules: dict[str, nn.Module]
) -> str:
    """Why ``method`` adapts nothing: the modules its targets matched and what it wants of them, in its own words."""
    if not passed_over:
        return f"method {name!r} found no target module after excludes and layer filters."
    listed = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in list(passed_over)[:4])
    more = f" and {len(passed_over) - 4} more" if len(passed_over) > 4 else ""
    reasons = []
    if "kind" in passed_over.values():
        reasons.append(f"it adapts only {', '.join(method.wraps)} modules")
    if "accepts" in passed_over.values():
        reasons.append(f"it takes only: {inspect.getdoc(method.accepts)}")
    return (
        f"method {name!r} adapts nothing in {type(model).__name__}: its targets matched {listed}{more}, and "
        f"{'; '.join(reasons)}"
    )


def _is_mha_out_proj(path: str, modules: dict[str, nn.Module]) -> bool:
    parent = path.rsplit(".", 1)[0]
    return path.endswith(".out_proj") and isinstance(modules.get(parent), nn.MultiheadAttention)


def _no_match(what: str, modules: dict[str, nn.Module]) -> str:
    names = list(modules)
    close = difflib.get_close_matches(what.split("'")[1] if "'" in what else what, names, n=5, cutoff=0.3)
    examples = close or names[:8]
    listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in examples)
    return f"{what} matches no module. Closest module names: {listed}."
