"""Leaderboard maths on hand-made results and on published rows, and the files the leaderboard writes."""

from __future__ import annotations

import csv
import io
import math

import pytest
from PIL import Image
from vbench import board
from vbench.report import suite_tasks, write_leaderboard
from vbench.runner import SCHEMA, check_result
from vbench.suite import load_suite

from tests.bench._helpers import BENCH, load_script

TASKS = [("a", "natural"), ("b", "natural"), ("c", "specialized"), ("d", "structured")]


def record(method, task, seed, top1, phase="final", protocol="standard", status="ok", group=None):
    groups = dict(TASKS) | {"mini_count": "structured"}
    r = {
        "schema": SCHEMA, "status": status, "suite": "test", "protocol": protocol, "phase": phase, "task": task,
        "group": group or groups[task], "method": method, "method_name": method, "options": {}, "seed": seed,
        "hparams": {"optim.lr": 0.001}, "train_split": "train800val200", "eval_split": "test", "overrides": [],
        "config": None, "git_commit": "abc", "versions": {}, "finished_at": "now", "top1": top1,
        "trainable_params": 1000, "trainable_params_with_head": 1500, "peak_memory_mb": 10.0,
        "images_per_second": 100.0, "wall_seconds": 2.0,
    }  # fmt: skip
    if status == "failed":
        r["error"] = "Traceback ...\nRuntimeError: boom"
    return r


RECORDS = [
    record("m1", "a", 0, 80.0), record("m1", "a", 1, 84.0), record("m1", "b", 0, 70.0), record("m1", "b", 1, 70.0),
    record("m1", "c", 0, 90.0), record("m1", "d", 0, 50.0), record("m1", "d", 1, 60.0),
    record("m2", "a", 0, 99.0), record("m2", "b", 0, 97.0), record("m2", "c", 0, 95.0),  # no structured result
    record("m1", "c", 0, 10.0, phase="tune"), record("m1", "c", 1, 10.0, protocol="literature"),  # not counted
    record("m2", "d", 0, 0.0, status="failed"),
]  # fmt: skip


def test_hand_made_results_give_both_means():
    table = board.rows(board.cells(RECORDS, "standard"), TASKS)
    m1, m2 = table  # m1 first: m2 has no complete mean
    assert m1["method"] == "m1" and m1["cells"]["a"].mean == 82.0
    assert m1["cells"]["a"].std == pytest.approx(math.sqrt(((80 - 82) ** 2 + (84 - 82) ** 2) / 1))  # ddof=1
    assert m1["cells"]["c"].std is None and m1["seeds"] == 2
    assert m1["natural"] == 76.0 and m1["specialized"] == 90.0 and m1["structured"] == 55.0
    assert m1["mean_groups"] == pytest.approx((76 + 90 + 55) / 3)
    assert m1["mean_tasks"] == pytest.approx((82 + 70 + 90 + 55) / 4)
    assert m2["natural"] == 98.0 and m2["structured"] is None
    assert m2["mean_groups"] is None and m2["mean_tasks"] is None  # never a partial mean shown as the whole
    parsed = list(csv.DictReader(io.StringIO(board.to_csv(table, TASKS, "standard", "top1"))))
    assert float(parsed[0]["mean_groups"]) == pytest.approx(73.6667, abs=1e-4) and parsed[1]["mean_tasks"] == ""
    assert float(parsed[0]["a_std"]) == pytest.approx(2.8284, abs=1e-4)


def test_published_rows_reproduce_the_papers_means():
    vtab = suite_tasks(load_suite("vtab1k"))
    rows = {r["method"]: r for r in board.read_published(BENCH / "published" / "vtab1k.csv", vtab)}
    # NOAH prints 75.5 (mean of group means); V-PETL prints 73.25 (19-task mean) for the same per-task numbers
    assert round(rows["NOAH"]["mean_groups"], 1) == 75.5 and round(rows["NOAH"]["mean_tasks"], 2) == 73.25
    assert round(rows["LoRA"]["mean_groups"], 2) == 74.60 and round(rows["LoRA"]["mean_tasks"], 2) == 72.25
    assert round(rows["Full"]["mean_groups"], 1) == 69.0 and round(rows["Full"]["natural"], 1) == 75.9
    assert rows["Convpass"]["mean_groups"] == 76.56 and rows["Convpass"]["mean_tasks"] is None  # groups only
    fgvc = suite_tasks(load_suite("fgvc"))
    ssf = next(r for r in board.read_published(BENCH / "published" / "fgvc.csv", fgvc) if r["method"] == "SSF")
    assert round(ssf["mean_tasks"], 2) == 90.72  # V-PETL's FGVC "Mean": the plain mean of five


def test_leaderboard_files_and_regeneration_from_runs_jsonl(tmp_path):
    suite = load_suite("minivtab")
    records = [record("lora", "mini_count", s, 40.0 + s) for s in range(3)]
    records += [record("lora", "xray", 0, 77.0, group="custom"), record("ssf", "mini_count", 0, 1.0, status="failed")]
    assert all(check_result(r) == [] for r in records)
    written = write_leaderboard(records, suite, tmp_path / "board")
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "| `lora` | 41.00 ± 1.00 |" not in text and "41.00 ± 1.00" in text  # the per-task cell
    assert "### other tasks" in text and "77.00" in text and "RuntimeError: boom" in text
    pngs = [p for p in written if p.suffix == ".png"]
    assert pngs and all(Image.open(p).size[0] > 100 for p in pngs)
    lines = (tmp_path / "board" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == len(records)
    first_csv = (tmp_path / "board" / "leaderboard_standard_top1.csv").read_text()
    tool = load_script("V-PEFT-Bench/leaderboard.py")
    args = ["--suite", "minivtab", "--results", str(tmp_path / "board" / "runs.jsonl"), "--out", str(tmp_path / "b2")]
    assert tool.main(args) == 0
    assert (tmp_path / "b2" / "leaderboard_standard_top1.csv").read_text() == first_csv
