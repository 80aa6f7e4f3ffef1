"""What the memory tables of this folder share: each row is measured in a fresh child process of the script.

A child starts at exec with its own high-water mark (``VmHWM``), so its peak is the row's alone. glibc raises its mmap
threshold as large blocks are freed and then keeps freed tensors in its heap, which moves a peak by tens of MB from
run to run; the child therefore runs with a fixed ``MALLOC_MMAP_THRESHOLD_`` (128 KiB: every tensor of that size or
more goes back to the system when freed), and repeats to about 1 MB (speed.py's docstring has the measurement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def rss_mb(field: str = "VmHWM") -> float:
    """A field of this process's ``/proc/self/status`` in MB: ``VmHWM`` the peak resident set, ``VmRSS`` the current."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child_json(script: str, args: list[str], what: str) -> dict:
    """Run ``python script *args`` with the fixed mmap threshold and return the JSON object its last stdout line
    prints; a failed child raises with the end of its stderr, naming ``what`` was measured."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # setting it at all turns glibc's dynamic raise off
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{what}: the child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def heading(what: str, script: str, argv: list[str] | None) -> tuple[str, str]:
    """The table's title line (what, the device, threads, torch) and the command that made it."""
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}"
    title = f"# {what}: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    return title, f"python V-PEFT-Bench/perf/{script}" + "".join(f" {a}" for a in (argv or sys.argv[1:]))


def peak_source() -> str:
    import torch

    return "`max_memory_allocated`." if torch.cuda.is_available() else "peak RSS of a child (fixed mmap threshold)."


def stream_table(lines: list[str], names: list[str], row: Callable[[str], str], out: Path | None) -> None:
    """Print the header ``lines``, then one row per name as it is measured (``row(name)``), and write the whole
    table to ``out`` (markdown, atomically) when given."""
    from vpeft.files import atomic_write

    print("\n".join(lines), flush=True)
    for name in names:
        lines.append(row(name))
        print(lines[-1], flush=True)
    if out:
        atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
