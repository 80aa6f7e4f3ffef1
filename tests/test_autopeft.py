"""AutoPEFT (vpeft.search) against independent computations: the Pareto front against a sweep over the points sorted
by parameters; a search on a synthetic objective writes every trial, never evaluates a configuration that adapts
nothing, and its front and plot are the trials'; tools/autopeft.py on a tiny text model trains each trial with the
trainable-parameter count a LoRA of that rank, placement and layers has."""

from __future__ import annotations

import json
import random
import signal

import pytest

from vpeft.errors import ConfigError
from vpeft.search import block_indices, overrides, pareto_front, search
from vpeft.search.autopeft import random_configuration

pytest.importorskip("optuna", reason="AutoPEFT's search needs optuna (pip install 'vpeft[search]')")


def sweep_front(points):
    """Non-dominated points by a sweep: by params ascending (score descending on ties), keep a strictly better score."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return sorted(front)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_a_sweep(seed):
    rng = random.Random(seed)
    points = [(rng.randint(0, 20) / 2, rng.choice([10, 20, 40, 80, 160])) for _ in range(30)]
    points = list(dict.fromkeys(points))  # duplicates are mutually non-dominating; the sweep keeps one
    assert sorted(pareto_front(points)) == sweep_front(points)


def test_overrides_and_block_indices():
    space = {"layer_0": 1, "layer_1": 0, "layer_2": 1, "log2_r": 3, "attn": 1, "ffn": 1}
    assert overrides(space, [0, 1, 2]) == [
        "method.r=8",
        "method.targets=[q, v, mlp_in, mlp_out]",
        "method.layers=[0, 2]",
    ]
    assert overrides({**space, "attn": 0, "ffn": 0}, [0, 1, 2]) is None
    assert overrides({**space, "layer_0": 0, "layer_2": 0}, [0, 1, 2]) is None
    assert block_indices(["m.encoder.layer.3.attention.self.query", "m.encoder.layer.0.output.dense"]) == [0, 3]


def test_search_on_a_synthetic_objective(tmp_path):
    seen = []

    def evaluate(edits):
        seen.append(edits)
        r = int(edits[0].split("=")[1])
        layers = json.loads(edits[2].split("=")[1])
        width = (2 if "q" in edits[1] else 0) + (3 if "mlp_in" in edits[1] else 0)
        return float(len(layers) * width + r**0.5), r * width * len(layers)

    summary = search(evaluate, [0, 1, 2, 3], 9, tmp_path / "s", startup=4, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "s" / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == len(seen) == 9 and all(e is not None for e in seen)
    points = [(r["score"], r["params"]) for r in rows]
    front = {(r["score"], r["params"]) for r in summary["pareto"]}
    assert front == {points[i] for i in sweep_front(points)}  # trials that tie on both are all on the front
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 1000
    with pytest.raises(Exception, match="exists"):
        search(evaluate, [0], 1, tmp_path / "s", log=lambda _: None)
    with pytest.raises(ConfigError, match="at least 1"):
        search(evaluate, [0], 0, tmp_path / "t", log=lambda _: None)


def test_search_advances_where_the_process_proposes_configurations_that_adapt_nothing(tmp_path, monkeypatch):
    """A flat score and the parameter objective pull the Gaussian process to the empty configuration, which it would
    propose at every ask (it fits completed trials only): each such proposal is replaced by a random valid one."""
    from vpeft.search import autopeft

    seen, replaced = [], []

    def evaluate(edits):
        seen.append(edits)
        layers = json.loads(edits[2].split("=")[1])
        width = (2 if "q" in edits[1] else 0) + (5 if "mlp_in" in edits[1] else 0)
        return 72.0, int(edits[0].split("=")[1]) * len(layers) * width

    def counted(rng, layers):
        replaced.append(1)
        return random_configuration(rng, layers)

    def stuck(signum, frame):
        raise TimeoutError("the search made no progress in 240 s")

    monkeypatch.setattr(autopeft, "random_configuration", counted)
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(240)
    try:
        search(evaluate, [0, 1, 2], 5, tmp_path / "s", startup=2, log=lambda _: None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert replaced, "the process proposed no empty configuration: this test no longer exercises the replacement"
    assert len(seen) == 5 and all(json.loads(e[2].split("=")[1]) for e in seen)


def test_random_configuration_always_adapts_something():
    rng = random.Random(0)
    for _ in range(200):
        layers = rng.sample(range(12), rng.randint(1, 4))
        assert overrides(random_configuration(rng, layers), layers) is not None


def test_tool_trains_each_trial_with_its_lora_size(tmp_path, one_thread):
    from tests.lm.test_text_tasks import bert_folder, label_rows, write_jsonl
    from tools import autopeft as tool

    bert = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "data", {"train": label_rows(16), "val": label_rows(6, 3), "test": label_rows(6, 5)})
    config = tmp_path / "text.yaml"
    config.write_text(f"""
task: text_classification
model: {{name: "hf:{bert}"}}
method: {{name: lora}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0}}
optim: {{lr: 1.0e-2}}
train: {{epochs: 1, max_steps: 2, tensorboard: false, seed: 0}}
""")
    # two random trials, then the Gaussian process (which once proposed an empty configuration forever here)
    assert tool.main([str(config), "--out", str(tmp_path / "a"), "--trials", "4", "--startup", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:  # hidden 32, MLP 64: q and v r(32 + 32) each, mlp_in and mlp_out r(32 + 64) each, per layer
        space = row["space"]
        per_layer = 2 ** space["log2_r"] * (2 * 64 * space["attn"] + 2 * 96 * space["ffn"])
        assert row["params"] == per_layer * sum(space[f"layer_{i}"] for i in (0, 1))
        summary = json.loads((tmp_path / "a" / f"trial_{row['trial']}" / "summary.json").read_text())
        assert summary["test_size"] == 6  # scored on the validation split
