"""Puts V-PEFT-Bench on ``sys.path`` so the tests import the harness package ``vbench`` as run.py does."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "V-PEFT-Bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
