"""Run metrics: one JSON object per line in ``metrics.jsonl`` (the source of truth) and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..files import atomic_write

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed each time, so a killed run keeps what it logged)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / METRICS
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step``, and the test record: a resumed run logs them again, so the file matches an
        uninterrupted run (a finished run resumed with ``--force`` gets one test line, its new one)."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line]
        kept = [line for line in lines if (r := json.loads(line))["step"] <= step and r.get("split") != "test"]
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                    prefix = record.get("split", "train")
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
