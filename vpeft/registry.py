"""Plain-dict registries and the one look-up that every registry uses.

A registry is an ordinary ``dict`` from a name to a class or a builder. Third parties extend one with
``METHODS["mine"] = Mine``; nothing is registered by import side effects.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """Return ``registry[name]`` or raise an :class:`UnknownNameError` (a ``KeyError``) naming close matches and the
    valid names."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(f"unknown {what} {name!r}.{hint} Valid names: {', '.join(sorted(registry))}.")
