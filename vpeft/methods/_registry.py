"""The dict behind ``vpeft.methods.METHODS``, kept apart from the table that fills it (``methods/__init__.py``), so
that a method which looks other methods up by name (SPT's ``structured`` option) reads the registry without
importing the package that imports it."""

from __future__ import annotations

from ..core import AdapterModule

METHODS: dict[str, type[AdapterModule]] = {}
