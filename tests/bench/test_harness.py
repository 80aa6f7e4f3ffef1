"""The harness: protocol plans and selection, result schema, skip on rerun, crash isolation, one real tiny run."""

from __future__ import annotations

import json

import pytest
import yaml
from vbench import runner
from vbench.protocol import final_runs, grid_points, parse_method, parse_seeds, select, tune_runs
from vbench.runner import check_result, collect
from vbench.suite import TaskRef, load_suite

from tests.bench._helpers import ROOT, fake_vtab, load_script

run_tool = load_script("V-PEFT-Bench/run.py")


@pytest.fixture
def suite_file(tmp_path):
    """A suite on the MiniVTAB recipe with a 3 x 2 grid, whose two task folders exist (so nothing is built)."""
    for task in ("mini_count", "mini_lesion"):
        (tmp_path / "data" / task).mkdir(parents=True)
    spec = {
        "recipe": str(ROOT / "configs" / "bench" / "recipes" / "minivtab.yaml"),
        "tasks": "minivtab",
        "data_root": str(tmp_path / "data"),
        "seeds": [0, 1, 2],
        "method_set": {"spt_lora": ["method.param_budget=0.012"]},
        "protocols": {
            "standard": {
                "tune": ["train800", "val200"],
                "final": ["train800val200", "test"],
                "grid": {"optim.lr": [1e-3, 2e-3, 4e-3], "optim.weight_decay": [1e-4, 1e-2]},
            },
            "literature": {"final": ["train800val200", "test"], "eval_every": 2},
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_order_fixed_keys_and_tie_breaking():
    points = grid_points({"optim.lr": [1, 2], "optim.weight_decay": [0, 9]})
    assert points == [
        (("optim.lr", 1), ("optim.weight_decay", 0)),
        (("optim.lr", 1), ("optim.weight_decay", 9)),
        (("optim.lr", 2), ("optim.weight_decay", 0)),
        (("optim.lr", 2), ("optim.weight_decay", 9)),
    ]
    assert grid_points({"optim.lr": [1, 2], "optim.weight_decay": [0, 9]}, fixed=["optim.lr"]) == [
        (("optim.weight_decay", 0),),
        (("optim.weight_decay", 9),),
    ]
    assert select([("a", 50.0), ("b", 61.0), ("c", 61.0), ("d", None)]) == "b"  # tie: the earlier point
    assert select([("a", None), ("b", None)]) is None


def test_plans_use_the_protocol_splits(suite_file):
    suite = load_suite(str(suite_file))
    task, method = TaskRef("mini_count", "structured", suite_file.parent), parse_method("spt_lora:r=4")
    tune = tune_runs(suite, task, method, seed=0, user_set=["optim.weight_decay=0.05"])
    assert len(tune) == 3  # weight decay fixed by the user: only the lr is searched
    assert {"data.train_split=train800", "data.val_split=null", "data.test_split=val200"} <= set(tune[0].overrides)
    assert "method.param_budget=0.012" in tune[0].overrides and "method.r=4" in tune[0].overrides
    assert tune[0].overrides[-1] == "optim.weight_decay=0.05"  # the user's --set comes last
    final = final_runs(suite, "standard", task, method, [0, 1], (("optim.lr", 2e-3),))
    assert [r.seed for r in final] == [0, 1] and "optim.lr=0.002" in final[1].overrides
    assert "data.val_split=null" in final[0].overrides and "data.test_split=test" in final[0].overrides
    literature = final_runs(suite, "literature", task, method, [5])
    assert {"data.val_split=test", "train.eval_every=2", "train.seed=5"} <= set(literature[0].overrides)
    assert str(final[0].rel_dir) == "standard/mini_count/spt_lora_r=4/final/seed=0"
    assert parse_seeds("2", suite) == [0, 1] and parse_seeds("7,9", suite) == [7, 9]
    with pytest.raises(ValueError, match="lists 3 seeds"):
        parse_seeds("4", suite)


def test_a_method_set_keyed_by_a_variant_applies_to_that_variant_only(suite_file):
    """``corda:mode=kpm`` keeps its own lr beside ``corda``'s: the variant's overrides follow its method's."""
    spec = yaml.safe_load(suite_file.read_text())
    spec["method_set"]["spt_lora:r=4"] = ["optim.lr=0.005", "method.param_budget=0.02"]
    suite_file.write_text(yaml.safe_dump(spec))
    suite = load_suite(str(suite_file))
    task = TaskRef("mini_count", "structured", suite_file.parent)
    variant = final_runs(suite, "literature", task, parse_method("spt_lora:r=4"), [0])[0].overrides
    plain = final_runs(suite, "literature", task, parse_method("spt_lora"), [0])[0].overrides
    other = final_runs(suite, "literature", task, parse_method("spt_lora:r=8"), [0])[0].overrides
    assert variant.index("method.param_budget=0.012") < variant.index("method.param_budget=0.02")
    assert "optim.lr=0.005" in variant and "optim.lr=0.005" not in plain and "optim.lr=0.005" not in other
    assert "method.param_budget=0.012" in plain and "method.param_budget=0.02" not in other


class FakeTrain:
    """Stands in for the engine: tune score 60 for lr >= 2e-3 (a tie), else 50; final score 70 + seed."""

    def __init__(self, fail_method: str | None = None):
        self.calls, self.fail_method = [], fail_method

    def __call__(self, cfg, run_dir, resume=False, force=False):
        self.calls.append(cfg)
        if cfg.method.name == self.fail_method and cfg.train.seed == 1 and cfg.data.test_split == "test":
            raise RuntimeError("out of memory in the fake")
        run_dir.mkdir(parents=True)
        top1 = (60.0 if cfg.optim.lr >= 2e-3 else 50.0) if cfg.data.test_split == "val200" else 70.0 + cfg.train.seed
        best = {"epoch": 1, "top1": top1 + 1} if cfg.data.val_split else None
        cost = {"peak_memory_mb": 1.0, "images_per_second": 5.0, "wall_seconds": 0.5, "epochs": cfg.train.epochs}
        return {"test": {"top1": top1}, "best_val": best, "trainable_params": 10, "trainable_params_with_head": 30,
                **cost}  # fmt: skip


def test_selection_schema_crash_isolation_and_skip_on_rerun(suite_file, tmp_path, monkeypatch, capsys):
    fake = FakeTrain(fail_method="ssf")
    monkeypatch.setattr(runner, "train", fake)
    args = ["--suite", str(suite_file), "--tasks", "count", "--methods", "lora,ssf", "--out", str(tmp_path / "out")]
    assert run_tool.main(args) == 1  # one run failed; the others went on
    assert len(fake.calls) == 2 * (6 + 3)
    records = collect(tmp_path / "out")
    assert len(records) == 18 and all(check_result(r) == [] for r in records)
    final = [r for r in records if r["phase"] == "final" and r["status"] == "ok"]
    assert {r["method"] for r in final} == {"lora", "ssf"} and len(final) == 5
    for r in final:  # lr 2e-3 and 4e-3 tie on val: the earlier grid point wins
        assert r["hparams"] == {"optim.lr": 0.002, "optim.weight_decay": 0.0001}
        assert r["config"]["optim"]["lr"] == 0.002 and r["config"]["data"]["train_split"] == "train800val200"
        assert r["top1"] == 70.0 + r["seed"] and r["task"] == "mini_count" and r["group"] == "structured"
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["method"] == "ssf" and failed[0]["seed"] == 1
    assert "RuntimeError: out of memory in the fake" in failed[0]["error"]
    board = (tmp_path / "out" / "leaderboard" / "leaderboard.md").read_text()
    assert "## Failed runs" in board and "out of memory in the fake" in board

    fake.calls.clear()
    fake.fail_method = None
    assert run_tool.main(args) == 0  # only the failed run runs again
    assert [(c.method.name, c.train.seed) for c in fake.calls] == [("ssf", 1)]
    assert "done before, skipped" in capsys.readouterr().out

    fake.calls.clear()
    assert run_tool.main([*args, "--methods", "lora", "--set", "train.epochs=5"]) == 0
    assert len(fake.calls) == 9  # a different config is not the finished run: everything reruns


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_real_tiny_run_of_an_unknown_task_folder(tmp_path):
    train, val = [0, 1] * 4, [1, 0]
    fake_vtab(tmp_path / "tasks" / "xray", {"train800": train, "val200": val, "train800val200": train + val,
                                            "test": [0, 1, 1, 0]})  # fmt: skip
    args = [
        "--suite", "minivtab", "--data-root", str(tmp_path / "tasks"), "--tasks", "xray", "--methods", "lora",
        "--seeds", "1", "--protocol", "literature", "--out", str(tmp_path / "out"), "--set", "model.pretrained=null",
        "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "train.epochs=3", "data.batch_size=4",
    ]  # fmt: skip
    assert run_tool.main(args) == 0
    (record,) = collect(tmp_path / "out")
    assert check_result(record) == [] and record["group"] == "custom" and record["protocol"] == "literature"
    assert record["trainable_params"] == 2 * 2 * 8 * (32 + 32) and record["trainable_params_with_head"] == 2048 + 66
    metrics = [json.loads(line) for line in open(record["run_dir"] + "/metrics.jsonl")]
    on_test = [m["top1"] for m in metrics if m.get("split") == "val"]  # literature: the engine's val split is test
    assert len(on_test) == 3 and record["top1_best_epoch"] == max(on_test) >= record["top1"]
    assert record["top1"] == [m for m in metrics if m.get("split") == "test"][-1]["top1"]
    assert not (tmp_path / "out" / record["run_dir"] / "checkpoint.pt").exists()
