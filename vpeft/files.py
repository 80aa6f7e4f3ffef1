"""Files written whole or not at all, with the permissions any other program of the user's would give them.

Every file vpeft writes (run configs, checkpoints, adapters, metrics, predictions, prepared data) goes through
:func:`atomic_write`. This module imports nothing from vpeft, so every layer, the core included, may use it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (POSIX has no call that reads it without setting it, hence the lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or kill during ``write`` leaves the previous ``path`` intact (``os.replace`` is atomic on POSIX and
    Windows). The file gets mode ``0o666 & ~umask``, as ``open(path, "w")`` would give it: ``mkstemp`` alone makes
    it 0600, which hides a shared run directory from the user's group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
