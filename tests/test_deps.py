"""Optional dependencies: :func:`vpeft.deps.require` names the package, the extra and the install command, and, read
from the source and ``pyproject.toml``, each extra installs what the paths that name it import."""

from __future__ import annotations

import ast
import importlib
import json
import os.path
import re
import sys
from pathlib import Path

import pytest
import tomllib

from vpeft.deps import distribution, require
from vpeft.errors import MissingDependencyError

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(spec: str) -> tuple[str, list[str]]:
    """``"vpeft[shapes]>=1"`` -> ``("vpeft", ["shapes"])``; ``"monai>=1.3"`` -> ``("monai", [])``."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    return canonical(m[1]), [e.strip() for e in (m[2] or "").split(",") if e.strip()]


def packages(specs: list[str]) -> set[str]:
    """The distributions ``specs`` install, vpeft's own extras (``vpeft[shapes]``) followed."""
    found: set[str] = set()
    for spec in specs:
        name, extras = requirement(spec)
        if name == "vpeft":
            for extra in extras:
                found |= packages(EXTRAS[extra])
        else:
            found.add(name)
    return found


BASE = packages(PROJECT["dependencies"])


def sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted((REPO / "vpeft").rglob("*.py"))]


def require_calls(tree: ast.Module) -> list[tuple[int, str, str]]:
    """``(line, module, extra)`` of each ``require("module", "extra", ...)`` call."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func == "require":
                module, extra = (a.value if isinstance(a, ast.Constant) else None for a in node.args[:2])
                calls.append((node.lineno, module, extra))
    return calls


def third_party_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of each absolute import of a module outside the standard library and vpeft."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "vpeft":
                found.append((node.lineno, top))
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


# ---------------------------------------------------------------------------------------------------------------------


def test_require_returns_the_module_it_imports():
    assert require("json", "hf", "a test") is json
    assert require("os.path", "hf", "a test") is os.path


def test_a_missing_package_is_named_with_its_extra_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # how Python marks a module as not importable
    with pytest.raises(MissingDependencyError) as caught:
        require("open_clip", "clip", "open_clip backbones")
    message = str(caught.value)
    assert message.startswith("open_clip backbones needs open_clip_torch, which cannot be imported")
    assert message.endswith("It comes with vpeft's 'clip' extra: pip install 'vpeft[clip]'.")
    assert isinstance(caught.value, ImportError)  # `except ImportError:` in a user's code keeps working


def test_a_path_without_its_package_names_its_extra(monkeypatch):
    """The segmentation task without MONAI: its import stops with the ``seg`` extra, which now installs MONAI."""
    monkeypatch.setitem(sys.modules, "monai.losses", None)
    monkeypatch.delitem(sys.modules, "vpeft.tasks.segmentation", raising=False)
    with pytest.raises(MissingDependencyError, match=r"needs monai, .*pip install 'vpeft\[seg\]'"):
        importlib.import_module("vpeft.tasks.segmentation")
    assert "monai" in packages(EXTRAS["seg"])


def test_each_required_module_is_installed_by_the_extra_named():
    problems, seen = [], 0
    for path, tree in sources():
        for line, module, extra in require_calls(tree):
            if path.name == "deps.py":
                continue
            seen += 1
            if module is None or extra is None:
                problems.append(f"{where(path, line)}: require() needs the module and extra as literal strings")
            elif extra not in EXTRAS:
                problems.append(f"{where(path, line)}: no extra {extra!r} in pyproject.toml ({sorted(EXTRAS)})")
            elif canonical(distribution(module)) not in packages(EXTRAS[extra]):
                problems.append(
                    f"{where(path, line)}: {module} ({distribution(module)}) is not in the {extra!r} extra "
                    f"{EXTRAS[extra]}"
                )
    assert seen >= 10  # the parser finds the calls (open_clip, SAM, HF, MONAI, COCO, mmseg...)
    assert not problems, "\n".join(problems)


def test_optional_packages_are_imported_only_through_require():
    """A package outside the base dependencies is imported by ``require``, or directly by a module of a package
    whose ``__init__`` requires it first (vpeft.medical)."""
    required_by_package: dict[Path, set[str]] = {}
    trees = sources()
    for path, tree in trees:
        if path.name == "__init__.py":
            required_by_package[path.parent] = {m.split(".")[0] for _, m, _ in require_calls(tree) if m}
    problems = []
    for path, tree in trees:
        guarded = set().union(*(required_by_package.get(p, set()) for p in path.parents))
        for line, top in third_party_imports(tree):
            if canonical(distribution(top)) not in BASE and top not in guarded:
                problems.append(
                    f"{where(path, line)}: imports {top} ({distribution(top)}), which is no base dependency; "
                    "import it with vpeft.deps.require(module, extra, purpose)"
                )
    assert not problems, "\n".join(problems)


def test_the_test_extra_installs_every_other_extra():
    others = set().union(*(packages(specs) for name, specs in EXTRAS.items() if name != "test"))
    assert others <= packages(EXTRAS["test"]), sorted(others - packages(EXTRAS["test"]))
