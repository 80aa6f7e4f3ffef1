"""The import rules of docs/architecture.md, checked on the source: no import cycle inside vpeft, only the core's
public face (``vpeft.core``) imported from outside it, and imports pointing down the layers.

Every ``import`` statement counts, those inside functions and ``if TYPE_CHECKING:`` blocks included; relative imports
are resolved, and ``from package import name`` is an import of ``package.name`` when that is a module. A failure
names each offending import as ``file:line``.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENTS = ("tools", "V-PEFT-Bench", "datasets")  # code outside the package that must also keep to the core's face

# The layers of docs/architecture.md, bottom up: a module may import its own layer and the layers below it.
# Leaf modules import nothing of vpeft but other leaves, and every layer may import them; the core may import
# only the leaves named in CORE_MAY_IMPORT.
LEAVES = {"files", "errors", "version", "registry", "deps"}
CORE_MAY_IMPORT = {"files", "errors", "deps"}  # deps: an optional package imported with its install hint
RANK = {
    "core": 0,
    "methods": 1,
    "optim": 1,
    "plugins": 1,
    "data": 1,
    "heads": 1,
    "backbones": 1,
    "medical": 1,
    "api": 2,
    "interop": 2,
    "compress": 2,
    "unir": 2,
    "": 2,  # the package itself, vpeft/__init__.py: the public functions
    "tasks": 3,
    "engine": 4,
    "integrations": 5,
    "federated": 5,
    "search": 5,
    "active": 5,
    "__main__": 5,
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    where: str  # file:line


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in ``path``, as the modules it loads (relative imports resolved against ``root``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    where = lambda node: f"{path.relative_to(root)}:{node.lineno}"  # noqa: E731
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, where(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append(Import(name, sub if is_module(sub, root) else module, where(node)))
    return found


def package_imports(root: Path) -> list[Import]:
    """The imports between modules of the ``vpeft`` package under ``root``."""
    found = []
    for path in sorted((root / "vpeft").rglob("*.py")):
        found += [i for i in imports_of(path, root) if i.target.split(".")[0] == "vpeft"]
    return found


def cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle per strongly connected group of modules (Tarjan), as the imports that close it."""
    graph: dict[str, list[Import]] = {}
    for i in imports:
        if i.source != i.target:
            graph.setdefault(i.source, []).append(i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in graph.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_loop_in(group, graph) for group in groups]


def _loop_in(group: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A path of imports that starts and ends at the same module, inside ``group``."""
    start = min(group)
    path: list[Import] = []
    seen: dict[str, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        edge = next(e for e in graph[node] if e.target in group)
        path.append(edge)
        node = edge.target
    return path[seen[node] :]


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer_violations(imports: list[Import]) -> list[str]:
    problems = []
    for i in imports:
        src, dst = layer_of(i.source), layer_of(i.target)
        if src == dst:
            continue
        if src in LEAVES:
            if dst not in LEAVES:
                problems.append(f"{i.where}: {i.target} is imported by the leaf module {i.source}")
        elif src == "core":
            if dst not in CORE_MAY_IMPORT:
                problems.append(f"{i.where}: the core imports {i.target}; it may import only vpeft.files, vpeft.errors")
        elif dst in LEAVES:
            continue
        elif src not in RANK or dst not in RANK:
            unknown = src if src not in RANK else dst
            problems.append(f"{i.where}: vpeft.{unknown} has no layer: add it to docs/architecture.md and RANK")
        elif RANK[dst] > RANK[src]:
            problems.append(f"{i.where}: {i.source} imports {i.target}, a layer above it")
    return problems


def face_violations(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Imports of a core submodule (``vpeft.core.inject``...) from outside ``vpeft/core``."""
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if path.is_relative_to(root / "vpeft" / "core"):
                continue
            for i in imports_of(path, root):
                if i.target.startswith("vpeft.core."):
                    problems.append(f"{i.where}: imports {i.target}; import it from vpeft.core (the core's face)")
    return problems


def describe(loop: list[Import]) -> str:
    return " -> ".join(f"{i.source} ({i.where})" for i in loop) + f" -> {loop[-1].target}"


# ---------------------------------------------------------------------------------------------------------------------


def test_no_import_cycle_in_vpeft():
    loops = cycles(package_imports(REPO))
    assert not loops, "import cycles:\n" + "\n".join(describe(loop) for loop in loops)


def test_outside_the_core_only_its_face_is_imported():
    problems = face_violations(REPO, ("vpeft", *CLIENTS))
    assert not problems, "\n".join(problems)


def test_imports_point_down_the_layers():
    problems = layer_violations(package_imports(REPO))
    assert not problems, "\n".join(problems)


def test_every_vpeft_module_has_a_layer():
    """A new subpackage must be placed in docs/architecture.md (and RANK) before the layer rules can cover it."""
    layers = {layer_of(module_name(p, REPO)) for p in (REPO / "vpeft").rglob("*.py")}
    assert layers <= set(RANK) | LEAVES, sorted(layers - set(RANK) - LEAVES)


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checks_name_planted_violations(tmp_path):
    """On a small tree with one of each violation, inside functions and under TYPE_CHECKING, each is found and named
    by file and line; the allowed imports of the same tree are not."""
    _plant(
        tmp_path,
        {
            "vpeft/__init__.py": "from .api import apply\n",
            "vpeft/api.py": "from .core import Report\nfrom . import interop\n\ndef apply():\n    pass\n",
            "vpeft/files.py": "",
            "vpeft/interop/__init__.py": "from .hf import export\n",
            "vpeft/interop/hf.py": "def export():\n    from ..api import apply\n",  # api -> interop -> hf -> api
            "vpeft/core/__init__.py": "from .inject import Report\nfrom ..files import x\n",
            "vpeft/core/inject.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..methods import M\nReport = 1\n"
            ),
            "vpeft/methods/__init__.py": "from ..core import Report\n",
            "vpeft/engine/__init__.py": "",
            "vpeft/engine/optim.py": "import vpeft.core\n\ndef groups():\n    from ..core import inject\n",
            "vpeft/tasks/__init__.py": "from ..engine import optim\n",
            "tools/train.py": "from vpeft.core.inject import Report\nimport vpeft.core\n",
        },
    )
    loops = cycles(package_imports(tmp_path))
    assert sorted(describe(loop) for loop in loops) == [
        "vpeft.api (vpeft/api.py:2) -> vpeft.interop (vpeft/interop/__init__.py:1) -> "
        "vpeft.interop.hf (vpeft/interop/hf.py:2) -> vpeft.api",
        "vpeft.core (vpeft/core/__init__.py:1) -> vpeft.core.inject (vpeft/core/inject.py:3) -> "
        "vpeft.methods (vpeft/methods/__init__.py:1) -> vpeft.core",
    ]
    assert face_violations(tmp_path, ("vpeft", "tools")) == [
        "vpeft/engine/optim.py:4: imports vpeft.core.inject; import it from vpeft.core (the core's face)",
        "tools/train.py:1: imports vpeft.core.inject; import it from vpeft.core (the core's face)",
    ]
    assert layer_violations(package_imports(tmp_path)) == [
        "vpeft/core/inject.py:3: the core imports vpeft.methods; it may import only vpeft.files, vpeft.errors",
        "vpeft/tasks/__init__.py:1: vpeft.tasks imports vpeft.engine.optim, a layer above it",
    ]
