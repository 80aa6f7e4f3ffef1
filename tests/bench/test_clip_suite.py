"""The CLIP suite (configs/bench/clip_scenes.yaml) and the harness paths it added: method variants, seed keys, evals
of a trained adapter on other classes, harmonic-mean columns, per-group tables and published rows beside ours."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from vbench import board
from vbench.protocol import final_runs, parse_method
from vbench.runner import check_result, collect
from vbench.suite import load_suite, resolve_tasks

from tests.bench._helpers import ROOT, load_script
from vpeft.data import build_loader
from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.engine.run_dir import open_run
from vpeft.errors import ConfigError, MissingFileError, UnknownNameError
from vpeft.methods import METHODS

run_tool = load_script("V-PEFT-Bench/run.py")
test_tool = load_script("tools/test.py")


def _run_config(suite, method: str, task: str = "base", seed: int = 1):
    ref = next(t for t in resolve_tasks(suite, [task], None))
    run = final_runs(suite, "quick", ref, parse_method(method, suite), [seed])[0]
    return load_config(ref.recipe, list(run.overrides))


@pytest.mark.parametrize("method", ["lora_both", "lora_image", "comp_lora_both", "coop"])
def test_variants_are_the_tools_train_configs_and_the_seed_draws_the_shots(method):
    """Each variant of the suite runs what ``configs/clip/<method>.yaml`` runs with tools/train.py, seed included."""
    suite = load_suite("clip_scenes")
    ours = _run_config(suite, method, seed=1)
    theirs = load_config(ROOT / "configs" / "clip" / f"{method}.yaml", ["train.seed=1", "data.options.seed=1"])
    assert ours.method == theirs.method and ours.model == theirs.model and ours.optim == theirs.optim
    assert ours.data.options == theirs.data.options == {"classes": "base", "shots": 16, "seed": 1}
    assert _run_config(suite, method, "4-shot", seed=2).data.options == {"classes": "base", "shots": 4, "seed": 2}


def test_equal_rank_variants_swap_the_settings_of_lora_and_comp_lora():
    """comp_lora_r8 has LoRA's settings (the defaults of lora_both) and lora_r2 Comp-LoRA's (of comp_lora_both)."""
    suite = load_suite("clip_scenes")
    keys = ("r", "alpha", "targets", "dropout")
    lora = {k: getattr(METHODS["lora"].Config(), k) for k in keys}
    comp = {k: getattr(METHODS["comp_lora"].Config(), k) for k in keys}
    assert lora != comp

    def settings(method):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in method.options.items() if k in keys}

    comp8, lora2 = _run_config(suite, "comp_lora_r8").method, _run_config(suite, "lora_r2").method
    assert (comp8.name, lora2.name) == ("comp_lora", "lora")
    assert settings(comp8) == lora and settings(lora2) == comp
    assert _run_config(suite, "comp_lora_r8:r=4").method.options["r"] == 4  # options come after the variant's set


def test_columns_must_be_unique_harmonic_means_name_an_eval_and_published_files_exist(tmp_path):
    recipe = ROOT / "configs" / "clip" / "_scenes_b2n.yaml"
    base = {"seeds": [0], "protocols": {"quick": {"final": ["train", "test"]}}}
    clash = {"a": {"recipe": str(recipe), "evals": {"b": []}}, "b": {"recipe": str(recipe)}}
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump({**base, "tasks": clash}))
    with pytest.raises(ConfigError, match="column 'b' of task 'b' is also a column of task 'a'"):
        load_suite(str(tmp_path / "clash.yaml"))
    missing = {**base, "tasks": {"a": {"recipe": str(recipe)}}, "published": {"file": "nope.csv", "note": "n"}}
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    with pytest.raises(MissingFileError, match="published.file 'nope.csv' is not a file in"):
        load_suite(str(tmp_path / "missing.yaml"))
    stray = {"a": {"recipe": str(recipe), "evals": {"novel": []}, "harmonic": {"HM": "new"}}}
    (tmp_path / "stray.yaml").write_text(yaml.safe_dump({**base, "tasks": stray}))
    with pytest.raises(ConfigError, match=r"tasks.a.harmonic.HM .* 'new', which is not one of the task's evals"):
        load_suite(str(tmp_path / "stray.yaml"))


def _record(method: str, seed: int, base: float, novel: float, baseline: bool = False) -> dict:
    return {"status": "ok", "phase": "final", "protocol": "quick", "task": "base", "group": "base_to_novel",
            "method": method, "seed": seed, "hparams": {}, "metric": "top1", "top1": base, "test_size": 600,
            "trainable_params": 512, "trainable_params_with_head": 512, "baseline": baseline,
            "evals": {"novel": {"top1": novel, "test_size": 600}}}  # fmt: skip


def test_harmonic_mean_per_seed_and_one_table_per_group():
    records = [_record("zero_shot", 0, 50.0, 40.0, True), _record("coop", 0, 80.0, 20.0)]
    records.append(_record("coop", 1, 70.0, 30.0))
    columns = board.with_columns(records, {"base": {"HM": "novel"}}, {"base": ["16-shot"]})
    found = board.cells(columns, "quick")
    assert found[("coop", "16-shot")].values == [80.0, 70.0]  # the base score again, in the k-shot group
    # HM per seed: 2*80*20/100 = 32, 2*70*30/100 = 42 -> mean 37, sample std 7.07; zero-shot 2*50*40/90 = 44.44
    assert found[("coop", "HM")].values == pytest.approx([32.0, 42.0])
    assert found[("zero_shot", "HM")].mean == pytest.approx(400 / 9)
    assert found[("coop", "novel")].test_size == 600 and found[("coop", "HM")].se is None
    tasks = load_suite("clip_scenes").task_table()
    assert tasks[:4] == [("base", "base_to_novel"), ("novel", "base_to_novel"), ("HM", "base_to_novel"),
                         ("held_out", "base_to_novel")] and tasks[-1] == ("16-shot", "k_shot")  # fmt: skip
    table = board.rows(found, tasks, means=False)
    text = board.markdown(table, tasks, "t", "c", means=False)
    assert "| method | params (no head) | seeds | base | novel | HM | held_out |" in text
    assert "| `coop` | 0.5K | 2 | 75.00 ± 7.07 (SE 1.77) | 25.00 ± 7.07 (SE 1.77) | 37.00 ± 7.07 |  |" in text
    assert "| seeds | 1-shot | 2-shot | 4-shot | 8-shot | 16-shot |" in text
    assert "| `coop` | 0.5K | 2 |  |  |  |  | 75.00 ± 7.07 (SE 1.77) |" in text
    assert "Mean" not in text and table[0]["method"] == "coop" and table[0]["mean_tasks"] is None  # best base first
    bad = {**records[1], "evals": {"novel": {"loss": 1.0}}}
    assert any("evals.novel" in p for p in check_result({**bad, "schema": "x"}))


def test_the_suite_runs_base_to_novel_through_run_py(tmp_path, capsys):
    """One short LoRA run and the zero-shot row: the novel and held-out scores are the adapter's predictions on those
    classes counted here by hand, and the leaderboard shows them with the harmonic mean and the published rows."""
    out, board_dir = tmp_path / "runs", tmp_path / "board"
    argv = ["--suite", "clip_scenes", "--protocol", "quick", "--tasks", "base", "--methods", "lora_both", "--seeds",
            "1", "--out", str(out), "--leaderboard", str(board_dir), "--set", "train.epochs=2", "optim.warmup_epochs=0",
            "optim.lr=1.0e-2", "data.options.shots=2", "data.options.test_per_class=10"]  # fmt: skip
    assert run_tool.main(argv) == 0
    records = {r["method"]: r for r in collect(out)}
    lora = records["lora_both"]
    assert lora["config"]["data"]["options"] == {"classes": "base", "shots": 2, "seed": 0, "test_per_class": 10}
    run_dir = out / "quick" / "base" / "lora_both" / "final" / "seed=0" / "run"
    for name, size in (("novel", 120), ("held_out", 60)):
        run = open_run(run_dir, [f"data.options.classes={name}"])
        loader = build_loader(run.datasets["test"], 100, train=False, num_workers=0)
        with torch.no_grad():
            right = sum(int((run.model(x).argmax(1) == y).sum()) for x, y in loader)
        assert lora["evals"][name]["top1"] == pytest.approx(100 * right / size)
        assert lora["evals"][name]["test_size"] == size
    assert records["zero_shot"]["trainable_params"] == 0
    zero_novel = records["zero_shot"]["evals"]["novel"]["top1"]
    assert lora["evals"]["novel"]["top1"] != zero_novel  # the adapter, not the pretrained model, was scored
    # tools/test.py --set scores the same adapter on the novel classes: the same number
    assert test_tool.main([str(run_dir), "--set", "data.options.classes=novel", "--out", "novel.json"]) == 0
    assert json.loads((run_dir / "novel.json").read_text())["top1"] == pytest.approx(lora["evals"]["novel"]["top1"])
    text = (board_dir / "leaderboard.md").read_text()
    base, novel = lora["top1"], lora["evals"]["novel"]["top1"]
    hm = 2 * base * novel / (base + novel)
    row = next(line for line in text.splitlines() if line.startswith("| `lora_both` | 9.2K | 1 |"))
    assert row.split(" | ")[3:6] == [f"{base:.2f} (SE {board.binomial_se(base, 120):.2f})",
                                     f"{novel:.2f} (SE {board.binomial_se(novel, 120):.2f})", f"{hm:.2f}"]  # fmt: skip
    assert "| CoOp | 82.69 | 63.22 | 71.66 |" in text and "| ours: `zero_shot` (baseline), quick |" in text
    assert (board_dir / "base_vs_novel_quick_top1.png").stat().st_size > 0


def test_an_unknown_method_names_the_suites_variants(capsys):
    with pytest.raises(UnknownNameError, match="Suite 'clip_scenes' also names lora_both, lora_image, comp_lora_both"):
        run_tool.main(["--suite", "clip_scenes", "--methods", "lora_bth", "--dry-run"])
    assert cli.run(run_tool.main, ["--suite", "clip_scenes", "--methods", "lora_bth"]) == 2  # before any run
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'lora_bth'") and err.count("\n") == 1 and "Traceback" not in err
