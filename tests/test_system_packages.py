"""The Debian packages of requirements/debian.txt: known to the readers, installed by the set-up, named when missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vpeft.data.system import SYSTEM_DATA, system_data

from .conftest import require_system_data

ROOT = Path(__file__).resolve().parents[1]


def listed_packages() -> list[str]:
    lines = (ROOT / "requirements" / "debian.txt").read_text().splitlines()
    return [word for line in lines for word in line.split("#", 1)[0].split()]


def test_the_list_and_the_readers_name_the_same_packages():
    assert sorted(listed_packages()) == sorted(SYSTEM_DATA)


@pytest.mark.parametrize("package", listed_packages())
def test_each_listed_package_is_installed(package):
    """Skips on a machine without the package; under CI=true the same absence fails (require_system_data)."""
    assert any(require_system_data(package).iterdir())


def test_a_missing_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(SYSTEM_DATA, "dataset-fashion-mnist", tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as err:
        system_data("dataset-fashion-mnist")
    assert str(tmp_path / "absent") in str(err.value)
    assert "sudo apt-get install dataset-fashion-mnist" in str(err.value)


def fake_tools(bin_dir: Path, uid: int) -> Path:
    """``dpkg-query`` that knows no package, ``apt-get`` that logs its arguments, ``id -u`` that prints ``uid``."""
    log = bin_dir / "apt.log"
    scripts = {
        "dpkg-query": "exit 1",
        "apt-get": f'echo "$*" >> {log}',
        "id": f"echo {uid}",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return log


def install_system_packages(bin_dir: Path) -> subprocess.CompletedProcess:
    """The set-up's Debian step (tools/setup_env.sh runs it after the Python environment), with fake tools first."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = ROOT / "tools" / "install_system_packages.sh"
    return subprocess.run(["bash", str(script), str(bin_dir / "setup.log")], env=env, capture_output=True, text=True)


def test_setup_installs_missing_packages_as_root(tmp_path):
    log = fake_tools(tmp_path, uid=0)
    result = install_system_packages(tmp_path)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update")
    assert calls[1].split()[-len(listed_packages()) :] == listed_packages()
    assert result.stdout.count("\n") == 1 and "installing system data" in result.stdout  # one line, apt's in the log


def test_setup_without_root_names_the_packages_and_the_command(tmp_path):
    log = fake_tools(tmp_path, uid=1000)
    result = install_system_packages(tmp_path)
    assert result.returncode == 0 and not log.exists()
    for package in listed_packages():
        assert package in result.stderr
    assert "sudo apt-get install" in result.stderr
