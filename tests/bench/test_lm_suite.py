"""Suites that write their tasks out (the ``lm`` suite's form): per-task recipes, baselines on their own tasks, the
``quick`` protocol, the test-split standard error and the check against the baselines, all computed by hand."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest
import yaml
from vbench import board, runner
from vbench.protocol import baselines, final_runs, parse_method, tune_runs
from vbench.report import check_summary, checks, write_leaderboard
from vbench.runner import check_result, collect
from vbench.suite import load_suite, resolve_tasks

from tests.bench._helpers import ROOT, load_script
from vpeft.engine.config import load_config

run_tool = load_script("V-PEFT-Bench/run.py")
MINIVTAB_RECIPE = ROOT / "configs" / "bench" / "recipes" / "minivtab.yaml"


@pytest.fixture
def suite_file(tmp_path):
    """Two written-out tasks whose recipes differ only in their lr, a baseline on one of them, both protocols."""
    for name, lr in (("alpha", 1e-3), ("beta", 4e-3)):
        (tmp_path / f"{name}.yaml").write_text(f"_base_: {MINIVTAB_RECIPE}\noptim: {{lr: {lr}}}\n")
    spec = {
        "tasks": {
            "alpha": {"recipe": "alpha.yaml", "metric": "accuracy", "group": "text", "set": ["data.batch_size=8"]},
            "beta": {"recipe": "beta.yaml", "metric": "exact_match", "group": "text"},
        },
        "seeds": [0, 1, 2],
        "set": ["train.tensorboard=false"],
        "baselines": {
            "shots": {"method": "linear", "tasks": ["beta"], "set": ["train.epochs=1"], "tune": False, "seeds": 1}
        },
        "check": {"method": "lora", "sigmas": 3},
        "protocols": {
            "standard": {"tune": ["train", "val"], "final": ["train", "test"], "grid": {"optim.lr": [1e-3, 2e-3]}},
            "quick": {"final": ["train", "test"]},
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_lm_suite_file_validates_and_names_its_recipes():
    suite = load_suite("lm")
    tasks = resolve_tasks(suite, None, None)
    assert [t.name for t in tasks] == ["wordnet16", "fortunes8", "lemmas"]
    expected = {"wordnet16": ("text_classification", "minilm", "wordnet_supersenses", 250),
                "fortunes8": ("text_classification", "minilm", "fortune_topics", 160),
                "lemmas": ("causal_lm", "smollm2", "wordnet_lemmas", None)}  # fmt: skip
    for task in tasks:
        assert task.recipe == ROOT / "configs" / "bench" / "recipes" / f"lm_{task.name}.yaml"
        assert task.root is None  # the text readers find their own data
        cfg = load_config(task.recipe, list(task.overrides))  # the task's _base.yaml under configs/lm, and its model
        task_name, model, data, test_per_class = expected[task.name]
        assert (cfg.task, cfg.model.name, cfg.data.name) == (task_name, model, data)
        assert cfg.data.options.get("per_class", {}).get("test") == test_per_class
    assert suite.metric() == "score"  # accuracy on two tasks, exact match on the third
    assert {"standard", "quick"} <= set(suite.protocols) and suite.protocols["quick"].tune is None
    refs = {ref.label: ref for ref in baselines(suite)}
    assert refs["linear"].tasks == ("wordnet16", "fortunes8") and refs["frozen_3shot"].tasks == ("lemmas",)
    assert refs["frozen_3shot"].name == "frozen" and "data.options.shots=3" in refs["frozen_3shot"].overrides
    assert suite.check.method == "lora" and suite.check.sigmas == 3


def test_written_out_tasks_resolve_with_their_own_recipe_and_overrides(suite_file):
    suite = load_suite(str(suite_file))
    alpha, beta = resolve_tasks(suite, None, None)
    assert alpha.recipe == suite_file.parent / "alpha.yaml" and beta.recipe == suite_file.parent / "beta.yaml"
    assert alpha.overrides == ("data.batch_size=8",) and beta.overrides == ()
    assert [t.name for t in resolve_tasks(suite, ["beta"], None)] == ["beta"]
    with pytest.raises(KeyError, match="Did you mean 'alpha'"):
        resolve_tasks(suite, ["alpah"], None)
    with pytest.raises(ValueError, match="--data-root"):
        resolve_tasks(suite, None, suite_file.parent)  # the recipes say where the data is
    lora = parse_method("lora")
    (final,) = final_runs(suite, "quick", alpha, lora, [2])
    assert not any(o.startswith("data.root=") for o in final.overrides)
    assert {"data.train_split=train", "data.val_split=null", "data.test_split=test", "data.batch_size=8"} <= set(
        final.overrides
    )
    assert tune_runs(suite, alpha, lora, 0, (), "quick") == []  # quick: the recipe's lr, nothing searched
    assert len(tune_runs(suite, alpha, lora, 0, (), "standard")) == 2
    (shots,) = baselines(suite)
    assert shots.applies_to(beta) and not shots.applies_to(alpha)
    assert tune_runs(suite, beta, shots, 0, (), "standard") == []  # tune: false


def test_suite_files_are_checked_when_loaded(tmp_path, suite_file):
    spec = yaml.safe_load(suite_file.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "baselines": {"x": {"tasks": ["gamma"]}}}))
    with pytest.raises(ValueError, match=r"baselines.x.tasks \['gamma'\] are not tasks of the suite"):
        load_suite(str(bad))
    bad.write_text(yaml.safe_dump({**spec, "tasks": {"alpha": {"recipe": "nowhere.yaml"}}}))
    with pytest.raises(FileNotFoundError, match="tasks.alpha.recipe"):
        load_suite(str(bad))
    bad.write_text(yaml.safe_dump({**spec, "tasks": "minivtab"}))  # a task table needs a recipe and a data root
    with pytest.raises(ValueError, match="needs recipe and data_root"):
        load_suite(str(bad))
    with pytest.raises(ValueError, match="--protocol literature: suite .* defines quick, standard"):
        load_suite(str(suite_file)).protocol("literature")


def test_standard_error_by_hand_in_cells_and_csv():
    records = [
        {"status": "ok", "phase": "final", "protocol": "quick", "method": "lora", "task": "alpha", "metric": "accuracy",
         "accuracy": acc, "test_size": 400, "trainable_params": 10, "trainable_params_with_head": 20, "hparams": {}}
        for acc in (70.0, 72.0)
    ]  # fmt: skip
    (cell,) = board.cells(records, "quick").values()
    assert cell.mean == 71.0 and cell.test_size == 400
    assert cell.se == pytest.approx(100 * math.sqrt(0.71 * 0.29 / 400))  # 2.2688...
    assert cell.se == pytest.approx(2.26881, abs=1e-5)
    assert board.cells([{**records[0], "test_size": None}], "quick")[("lora", "alpha")].se is None
    table = board.rows(board.cells(records, "quick"), [("alpha", "text")])
    row = next(csv.DictReader(io.StringIO(board.to_csv(table, [("alpha", "text")], "quick", "accuracy"))))
    assert float(row["alpha_se"]) == pytest.approx(2.2688, abs=1e-4)  # the CSV keeps 4 decimals
    assert float(row["alpha_std"]) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert "71.00 ± 1.41 (SE 2.27)" in board.markdown(table, [("alpha", "text")], "t", "c")


def cell(mean, n, baseline=False):
    return board.Cell([mean], 0, 0, test_size=n, baseline=baseline)


def test_three_standard_error_verdict_by_hand():
    # 60% and 50% on 500 items: SEs 2.1909 and 2.2361, the gap's SE sqrt(4.8 + 5.0) = 3.1305, the gap 10 = 3.19 SE
    gap, ratio, passed, paired = board.verdict(cell(60.0, 500), cell(50.0, 500), 3)
    assert (
        not paired
        and gap == 10.0
        and ratio == pytest.approx(10 / math.sqrt(0.6 * 0.4 / 500 * 1e4 + 0.5 * 0.5 / 500 * 1e4))
    )
    assert ratio == pytest.approx(3.1944, abs=1e-4) and passed
    assert not board.verdict(cell(60.0, 500), cell(50.0, 500), 3.5)[2]
    assert board.verdict(cell(50.0, 500), cell(60.0, 500), 3)[2] is False  # losing never passes
    assert board.verdict(cell(60.0, None), cell(50.0, 500), 3) == (10.0, None, False, False)  # no n, no claim


def hits_cell(*seeds, data="d"):
    values = [100.0 * h.count("1") / len(h) for h in seeds]
    return board.Cell(values, 0, 0, test_size=len(seeds[0]), hits=list(seeds), data=[data] * len(seeds))


def test_paired_verdict_by_hand():
    # 10 items; the method gets items 0-6 right, the baseline 0-4 and 9: discordant items 5, 6 (+1 each) and 9 (-1).
    method, base = hits_cell("1111111000"), hits_cell("1111100001")
    d = [0, 0, 0, 0, 0, 1, 1, 0, 0, -1]  # mean 0.1, sample std sqrt((2 * 0.81 + 0.01 * 7 + 1.21) / 9) = 0.5676
    se = 100 * statistics.stdev(d) / math.sqrt(10)
    assert board.paired_se(method, base) == pytest.approx(se) and se == pytest.approx(17.951, abs=1e-3)
    gap, ratio, passed, paired = board.verdict(method, base, 0.5)
    assert paired and passed and gap == pytest.approx(10.0) and ratio == pytest.approx(10.0 / se)
    # unpaired, the same gap is 10 / sqrt(se(70%)^2 + se(60%)^2) = 10 / 21.213: the pairing's SE is smaller here
    assert 10.0 / math.hypot(board.binomial_se(70, 10), board.binomial_se(60, 10)) < ratio
    # two seeds: per item the share of seeds right; the second seed misses item 0 and gets item 8
    two = hits_cell("1111111000", "0111111010")
    shares = [0.5, 1, 1, 1, 1, 1, 1, 0, 0.5, 0]
    base_shares = [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    expected = 100 * statistics.stdev([a - b for a, b in zip(shares, base_shares, strict=True)]) / math.sqrt(10)
    assert board.paired_se(two, base) == pytest.approx(expected)


def test_no_pairing_across_data_configs_or_missing_hits():
    method, base = hits_cell("1111111000"), hits_cell("1111100001")
    assert board.paired_se(method, hits_cell("1111100001", data="other")) is None  # other items or prompts
    assert board.paired_se(method, hits_cell("11111000")) is None  # another split size
    assert board.paired_se(method, board.Cell([60.0], 0, 0, test_size=10)) is None  # records without hits
    assert board.verdict(method, board.Cell([60.0], 0, 0, test_size=10), 3)[3] is False  # falls back to unpaired
    assert board.paired_se(method, base) is not None


def quick_record(method, task, seed, value, metric, baseline=False, n=500):
    return {
        "schema": runner.SCHEMA, "status": "ok", "suite": "s", "protocol": "quick", "phase": "final", "task": task,
        "group": "text", "method": method, "method_name": method, "baseline": baseline, "options": {}, "seed": seed,
        "hparams": {}, "train_split": "train", "eval_split": "test", "overrides": [], "config": None,
        "git_commit": "abc", "versions": {}, "finished_at": "now", "metric": metric, metric: value, "test_size": n,
        "trainable_params": 1000, "trainable_params_with_head": 1500, "peak_memory_mb": 10.0,
        "images_per_second": 100.0, "wall_seconds": 2.0,
    }  # fmt: skip


def test_check_compares_with_the_best_baseline_of_each_task(suite_file, tmp_path):
    suite = load_suite(str(suite_file))
    records = [
        quick_record("lora", "alpha", 0, 60.0, "accuracy"), quick_record("lora", "beta", 0, 55.0, "exact_match"),
        quick_record("shots", "beta", 0, 50.0, "exact_match", baseline=True),
        quick_record("weak", "beta", 0, 20.0, "exact_match", baseline=True),
    ]  # fmt: skip
    assert all(check_result(r) == [] for r in records)
    (entries,) = checks(records, suite).values()
    alpha, beta = entries
    assert alpha["passed"] is None and alpha["baseline"] is None  # no baseline on alpha: no verdict
    assert beta["baseline"] == "shots" and beta["gap"] == 5.0  # the best baseline, not the weak one
    se_lora, se_shots = 100 * math.sqrt(0.55 * 0.45 / 500), 100 * math.sqrt(0.5 * 0.5 / 500)  # 2.2249, 2.2361
    assert beta["ratio"] == pytest.approx(5 / math.hypot(se_lora, se_shots))
    assert beta["passed"] is False  # 5 points = 1.6 SE
    assert beta["paired"] is False  # no per-item hits in these records
    lines = check_summary(checks(records, suite)).splitlines()
    assert lines[0] == "check quick alpha: lora: no baseline result"
    assert lines[1].startswith("check quick beta: lora 55.00 vs shots 50.00: +5.00 = 1.6 SE, FAIL")
    write_leaderboard(records, suite, tmp_path / "board")
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "`shots` (baseline)" in text
    # the same records with per-item hits (the same items: equal data configs) are compared item by item
    hits = {"lora": "1" * 275 + "0" * 225, "shots": "1" * 250 + "0" * 250, "weak": "1" * 100 + "0" * 400}
    paired = [r | {"test_hits": hits[r["method"]]} for r in records if r["task"] == "beta"]
    assert all(check_result(r) == [] for r in paired)
    assert check_result(paired[0] | {"test_hits": "1" * 10}) == [
        "test_hits is not a string of 0 and 1, one per test item"
    ]
    (entries,) = checks(paired, suite).values()
    beta = entries[1]
    d = [0.0] * 250 + [1.0] * 25 + [0.0] * 225  # lora's 25 extra hits, nothing the baseline alone gets
    assert beta["paired"] and beta["ratio"] == pytest.approx(5.0 / (100 * statistics.stdev(d) / math.sqrt(500)))
    assert beta["passed"]  # 5 points = 5.1 paired SE
    assert "5.1 paired SE, PASS" in check_summary(checks(paired, suite))
    assert "| beta | 55.00 (SE 2.22) | `shots` 50.00 (SE 2.24) | +5.00 | 1.6 | unpaired | fail |" in text
    assert (tmp_path / "board" / "leaderboard_quick_score.csv").is_file()  # two metrics: "score"


class FakeTrain:
    """Stands in for the engine: records each config; accuracy 50 + 100 * lr (the recipe's lr shows through)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, run_dir, resume=False, force=False):
        self.calls.append(cfg)
        run_dir.mkdir(parents=True)
        metric = "exact_match" if cfg.optim.lr > 3e-3 else "accuracy"
        value = 50.0 + 1000 * cfg.optim.lr
        return {"metric": metric, "test": {metric: value, "loss": 1.0}, "test_size": 200, "best_val": None,
                "trainable_params": 10, "trainable_params_with_head": 30, "peak_memory_mb": 1.0,
                "images_per_second": 5.0, "wall_seconds": 0.5, "epochs": 1}  # fmt: skip


def test_a_sweep_runs_each_task_from_its_recipe_and_baselines_on_their_tasks(suite_file, tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(runner, "train", fake)
    out = tmp_path / "out"
    args = ["--suite", str(suite_file), "--methods", "lora", "--seeds", "2", "--protocol", "quick", "--out", str(out)]
    assert run_tool.main(args) == 0
    runs = sorted((c.method.name, c.optim.lr, c.data.batch_size, c.train.seed) for c in fake.calls)
    assert runs == [
        ("linear", 4e-3, 32, 0),
        ("lora", 1e-3, 8, 0),
        ("lora", 1e-3, 8, 1),
        ("lora", 4e-3, 32, 0),
        ("lora", 4e-3, 32, 1),
    ]  # fmt: skip (the baseline: on beta only, its first seed only)
    records = collect(out)
    assert all(check_result(r) == [] for r in records) and len(records) == 5
    beta = [r for r in records if r["task"] == "beta" and r["method"] == "lora"]
    assert all(r["metric"] == "exact_match" and r["exact_match"] == pytest.approx(54.0) for r in beta)
    assert all(r["test_size"] == 200 and r["test_metrics"]["loss"] == 1.0 for r in records)
    assert {r["baseline"] for r in records if r["method"] == "shots"} == {True}
    assert (out / "leaderboard" / "leaderboard.md").is_file()
    fake.calls.clear()
    assert run_tool.main([*args, "--no-baselines"]) == 0 and fake.calls == []  # all done before: skipped
