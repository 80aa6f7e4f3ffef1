"""Facts about the machine and the software a run records: versions, git commit, peak memory."""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "vpeft",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pydantic",
    "transformers",
    "peft",
    "open_clip_torch",
    "segment_anything",
    "monai",
    "numpy",
)


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {k: v for k, v in versions().items() if v is not None},
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory window. On CUDA the allocator's peak; on Linux CPUs the process's resident-set
    high-water mark (``/proc/self/clear_refs``, Linux 4.0+), so that runs done one after another in one process (the
    benchmark harness) each report their own peak, not the largest of all before them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's since it started
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; on CPU the peak resident set size since :func:`reset_peak_memory` (Linux's
    ``VmHWM``), or since the process started where ``/proc`` does not say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
