"""Data that Debian packages install, and what to tell a user whose machine lacks it.

``requirements/debian.txt`` lists the packages; ``tools/setup_env.sh`` installs the missing ones when it runs as
root. Each package here maps to the path it installs, so a reader, a test or a tool can say which package and which
command would bring a missing file.
"""

from __future__ import annotations

from pathlib import Path

from vpeft.errors import MissingFileError

SYSTEM_DATA: dict[str, Path] = {
    "dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "wordnet-base": Path("/usr/share/wordnet"),
    "fortunes": Path("/usr/share/games/fortunes"),
}


def install_hint(package: str) -> str:
    """How to get ``package``: the apt-get command, and the set-up script that installs every listed package."""
    return (
        f"install the Debian package with `sudo apt-get install {package}` (as root, `bash tools/setup_env.sh` "
        "installs every package of requirements/debian.txt)"
    )


def system_data(package: str) -> Path:
    """The path ``package`` installs; a :class:`MissingFileError` naming the package and the command if it is absent."""
    path = SYSTEM_DATA[package]
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist: it comes from the Debian package {package}; {install_hint(package)}."
        )
    return path
