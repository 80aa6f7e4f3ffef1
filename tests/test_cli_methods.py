"""``python -m vpeft methods``: the registry by family (the README's table) and each method's options."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vpeft.__main__ import main
from vpeft.engine import cli
from vpeft.methods import FAMILIES, METHODS
from vpeft.methods.lora import LoRA, LoRAConfig

ROOT = Path(__file__).resolve().parents[1]


def test_families_partition_the_registry_as_the_readme_table_does():
    names = [n for family in FAMILIES.values() for n in family]
    assert sorted(names) == sorted(METHODS) and len(names) == len(set(names))
    table_text = (ROOT / "README.md").read_text().split("## Methods\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table_text.splitlines()[2:]]  # below the header and its rule
    table = {family.strip(): tuple(re.findall(r"`(\w+)`", cell)) for family, cell in rows}
    assert table == FAMILIES


def test_methods_lists_every_name_under_its_family(capsys, monkeypatch):
    class Mine(LoRA):
        pass

    monkeypatch.setitem(METHODS, "mine", Mine)  # a third party's method, documented as METHODS["mine"] = Mine
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    for family, names in [*FAMILIES.items(), ("registered elsewhere", ("mine",))]:
        listed = out[out.index(family) + 1 :]
        end = next(i for i, line in enumerate(listed) if not line.startswith("  "))
        block = " ".join(line.strip() for line in listed[:end])
        assert block.split(", ") == list(names)


def test_options_give_type_default_and_doc(capsys):
    assert main(["methods", "--options", "lora"]) == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(LoRAConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert f"\n  {field.name}: " in out and f" = {default!r}" in out
    assert "  r: int = 8  (>= 1, at most min(out, in) of each target)\n" in out
    assert "  alpha: float = 8.0  (a finite number)\n      the update is scaled by alpha / r\n" in out
    assert "  dropout: float = 0.1  (in [0, 1))\n" in out
    assert "  layers: tuple[int, ...] | None = None\n      block indices to adapt" in out  # MethodConfig's docstring


def test_unknown_method_gives_close_matches_and_status_2(capsys):
    assert cli.run(main, ["methods", "--options", "lorra"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'lorra'") and "Did you mean 'lora'" in err


def test_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vpeft", "methods", "--options", "ssf"], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ssf (vpeft.methods.ssf.SSF) options")
    bad = subprocess.run([sys.executable, "-m", "vpeft", "method"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice: 'method'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_prints_its_options(name, capsys):
    assert main(["methods", "--options", name]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {f.name}: " in out for f in dataclasses.fields(METHODS[name].Config))
