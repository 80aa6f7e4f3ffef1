"""The CPU peak-memory window: a run done after another in the same process reports its own peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vpeft.engine.system import peak_memory_mb, reset_peak_memory


def resident_mb() -> float:
    """The current resident set (``VmRSS``), read independently of the function under test."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_cpu_peak_restarts_at_reset():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        pytest.skip(f"the resident-set high-water mark cannot be reset here: {err}")
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, every page touched; freed with munmap (above glibc's mmap limit)
    during = peak_memory_mb(cpu)
    assert during >= resident_mb() - 1 and during > 256
    del big
    reset_peak_memory(cpu)
    after = peak_memory_mb(cpu)
    assert after < during - 200  # the 256 MiB of the earlier "run" no longer counts
    assert abs(after - resident_mb()) < 50  # the window starts at the memory in use now
