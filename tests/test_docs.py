"""docs/methods.md is generated from the method modules; it must match the registry and the docstrings."""

from __future__ import annotations

from tools import make_methods_doc


def test_methods_page_is_up_to_date():
    assert make_methods_doc.main(["--check"]) == 0, "run: python tools/make_methods_doc.py"
