"""``python -m vpeft``: facts about this installation.

    python -m vpeft env                     # versions for a bug report
    python -m vpeft methods                 # registered methods by family
    python -m vpeft methods --options lora  # a method's options: type, default, what it does
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
from typing import Any


def env() -> int:
    from .engine.system import environment

    info = environment()
    for key, value in info.pop("versions").items():
        print(f"{key:<20} {value}")
    for key, value in info.items():
        print(f"{key:<20} {value}")
    return 0


def methods() -> int:
    from .methods import FAMILIES, METHODS

    listed = {name for names in FAMILIES.values() for name in names}
    groups = {family: [n for n in names if n in METHODS] for family, names in FAMILIES.items()}
    groups["registered elsewhere"] = [n for n in METHODS if n not in listed]
    for family, names in groups.items():
        if names:
            print(family)
            print(textwrap.fill(", ".join(names), width=100, initial_indent="  ", subsequent_indent="  "))
    print("python -m vpeft methods --options NAME: a method's options with their types and defaults")
    return 0


def options(name: str) -> int:
    from .core import option_types
    from .methods import METHODS
    from .registry import lookup

    cls = lookup(METHODS, name, "method")  # an unknown name: close matches, and the command line exits 2
    types = option_types(cls.Config)
    print(f"{name} ({cls.__module__}.{cls.__qualname__}) options, as `option: type = default  (allowed values)`:")
    for field, doc in option_docs(cls.Config):
        type_name, allowed = types[field.name]
        print(f"  {field.name}: {type_name} = {_default(field)!r}" + (f"  ({allowed})" if allowed else ""))
        if doc:
            print(textwrap.fill(doc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return 0


def option_docs(config_cls: type) -> list[tuple[dataclasses.Field, str]]:
    """Each field of a method's config dataclass with the first sentence of its doc: an ``Attributes:`` entry of a
    class docstring, or the comment after the field in the class body (a subclass's doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_attribute_entries(inspect.getdoc(klass) or ""))
            docs.update(_field_comments(klass))
    return [(f, docs.get(f.name, "")) for f in dataclasses.fields(config_cls)]


def _attribute_entries(docstring: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, each cut to its first sentence."""
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", docstring, re.MULTILINE)
    if not section:
        return {}
    entries: dict[str, str] = {}
    for match in re.finditer(r"^ {4}(\w+): (.*(?:\n {5,}.*)*)", section.group(1), re.MULTILINE):
        entries[match.group(1)] = _first_sentence(" ".join(match.group(2).split()))
    return entries


def _field_comments(klass: type) -> dict[str, str]:
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):  # a class made at run time has no source
        return {}
    found = re.finditer(r"^ {4}(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE)
    return {m.group(1): _first_sentence(m.group(2).strip()) for m in found}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s", text.replace("``", ""), maxsplit=1)[0]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "(required)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpeft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions for a bug report")
    listing = commands.add_parser("methods", help="registered methods by family")
    listing.add_argument("--options", metavar="NAME", help="print the options of method NAME")
    args = parser.parse_args(argv)
    if args.command == "env":
        return env()
    return options(args.options) if args.options else methods()


if __name__ == "__main__":
    from .engine import cli

    sys.exit(cli.run(main, sys.argv[1:]))
