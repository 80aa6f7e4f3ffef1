"""The base-to-novel report of V-PEFT-Bench/clip_base_to_novel.py on hand-made rows."""

from __future__ import annotations

from ..bench._helpers import load_script

b2n = load_script("V-PEFT-Bench/clip_base_to_novel.py")


def test_table_has_harmonic_means_and_changes_against_zero_shot():
    rows = [
        {"method": "zero_shot", "seed": None, "base": 50.0, "novel": 40.0, "held_out": 30.0, "trainable_params": 0},
        {"method": "coop", "seed": 0, "base": 80.0, "novel": 20.0, "held_out": 10.0, "trainable_params": 512},
        {"method": "coop", "seed": 1, "base": 70.0, "novel": 30.0, "held_out": 20.0, "trainable_params": 512},
    ]
    text = b2n.table(rows, "cmd")
    zero = next(line for line in text.splitlines() if line.startswith("| zero_shot"))
    assert "| 44.44 |" in zero  # 2 * 50 * 40 / 90
    coop = next(line for line in text.splitlines() if line.startswith("| coop"))
    # HM per seed: 32.00 and 42.00 -> mean 37.00, sample std 7.07; base gain 25 +- 7.07, novel change -15 +- 7.07
    assert "| 75.00 ± 7.07 | 25.00 ± 7.07 | 37.00 ± 7.07 |" in coop
    assert coop.endswith("| 25.00 ± 7.07 | -15.00 ± 7.07 |")
    assert "CoCoOp, CVPR 2022" in text
