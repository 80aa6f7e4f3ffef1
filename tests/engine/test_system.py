"""The CPU peak-memory window: a run done after another in the same process reports its own peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# In a fresh interpreter: what else the test session holds (allocator caches, other tests' threads) stays out of it.
SCRIPT = """
import json
from pathlib import Path
import torch
from vpeft.engine.system import peak_memory_mb, reset_peak_memory

def resident_mb():  # the current resident set, read independently of the functions under test
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

cpu = torch.device("cpu")
reset_peak_memory(cpu)
big = torch.ones(256 * 2**20 // 4)  # 256 MiB, every page touched; freed with munmap (above glibc's mmap limit)
during, resident_during = peak_memory_mb(cpu), resident_mb()
del big
reset_peak_memory(cpu)
print(json.dumps({"during": during, "resident_during": resident_during, "after": peak_memory_mb(cpu),
                  "resident_after": resident_mb()}))
"""


def test_cpu_peak_restarts_at_reset():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        pytest.skip(f"the resident-set high-water mark cannot be reset here: {err}")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert m["during"] >= m["resident_during"] - 1 and m["resident_during"] - m["resident_after"] > 200
    assert m["after"] < m["during"] - 200  # the 256 MiB of the earlier "run" no longer counts
    assert abs(m["after"] - m["resident_after"]) < 50  # the window starts at the memory in use now
