"""STAR (vpeft/active, vpeft/plugins/lora_b_decay.py, tools/star.py) against hand computations: the entropies, the
Monte-Carlo mean and the dynamic mix on made-up probabilities pick the items worked out by hand; the decay on B is
AdamW's decoupled decay on B alone, checked on one step; the loop's bookkeeping on a tiny BERT (no item labelled
twice, k more per round, the labelled sets on disk, random selection reproducible by seed); the CLI's refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vpeft
from vpeft.active import Budget, dynamic_uncertainty, dynamic_weight, entropy, mc_entropy, minmax, random_k, top_k
from vpeft.core import WHOLE, adapted_modules
from vpeft.engine import cli
from vpeft.errors import ConfigError, ExistingPathError
from vpeft.optim import build_optimizer

from .lm.models import batches, task_loss, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

# made-up class probabilities of five pool items (two classes); item 4 has a zero, which the 1e-6 clip keeps finite
PROBS = [[0.5, 0.5], [0.9, 0.1], [0.99, 0.01], [0.7, 0.3], [1.0, 0.0]]
BASE = [0.0, 0.2, 1.0, 0.1, 0.9]  # the base model's normalised uncertainty of the same items


def h(row):
    """-sum p log p by hand, each p clipped below at 1e-6."""
    return -sum(max(p, 1e-6) * math.log(max(p, 1e-6)) for p in row)


def test_entropy_and_monte_carlo_mean_by_hand():
    np.testing.assert_allclose(entropy(np.array(PROBS)), [h(r) for r in PROBS], rtol=1e-12)
    assert entropy(np.array([[0.25] * 4]))[0] == pytest.approx(math.log(4))
    second = [[0.6, 0.4], [0.5, 0.5], [0.8, 0.2], [0.7, 0.3], [0.9, 0.1]]
    want = [(h(a) + h(b)) / 2 for a, b in zip(PROBS, second, strict=True)]  # a mean of entropies, as the code does
    np.testing.assert_allclose(mc_entropy(np.array([PROBS, second])), want, rtol=1e-12)
    with pytest.raises(ValueError, match="passes, items, classes"):
        mc_entropy(np.array(PROBS))


def test_dynamic_weight_follows_the_code_schedule():
    assert [dynamic_weight(t) for t in (0, 1, 4, 9, 15)] == pytest.approx([0.1, 0.2, 0.5, 1.0, 1.0])
    assert dynamic_weight(1, step=0.25) == 0.5
    with pytest.raises(ValueError):
        dynamic_weight(-1)


def test_selection_picks_the_items_worked_out_by_hand():
    # by hand: H = [0.6931, 0.3251, 0.0560, 0.6109, 1.4e-5]; normalised (H - min) / (max - min)
    hs = [h(r) for r in PROBS]
    ft = [(x - min(hs)) / (max(hs) - min(hs)) for x in hs]  # ~ [1, 0.469, 0.081, 0.881, 0]
    early = [0.1 * f + 0.9 * b for f, b in zip(ft, BASE, strict=True)]  # ~ [0.10, 0.23, 0.91, 0.18, 0.81]
    late = [0.9 * f + 0.1 * b for f, b in zip(ft, BASE, strict=True)]  # ~ [0.90, 0.44, 0.17, 0.80, 0.09]
    np.testing.assert_allclose(dynamic_uncertainty(entropy(np.array(PROBS)), BASE, t=0), early, rtol=1e-12)
    np.testing.assert_allclose(dynamic_uncertainty(entropy(np.array(PROBS)), BASE, t=8), late, rtol=1e-12)
    # the first selection trusts the base model, the ninth the fine-tuned one; plain entropy ignores the base
    assert top_k(dynamic_uncertainty(entropy(np.array(PROBS)), BASE, t=0), 2).tolist() == [2, 4]
    assert top_k(dynamic_uncertainty(entropy(np.array(PROBS)), BASE, t=8), 2).tolist() == [0, 3]
    assert top_k(entropy(np.array(PROBS)), 3).tolist() == [0, 3, 1]
    assert top_k(np.array([1.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]  # ties: the lower index first
    assert minmax(np.array([3.0, 3.0])).tolist() == [0.0, 0.0]


def test_random_selection_is_reproducible_and_distinct():
    a = random_k(50, 10, np.random.default_rng([3, 1]))
    assert a.tolist() == random_k(50, 10, np.random.default_rng([3, 1])).tolist()
    assert len(set(a.tolist())) == 10 and a.tolist() != random_k(50, 10, np.random.default_rng([4, 1])).tolist()
    with pytest.raises(ValueError, match="cannot pick"):
        random_k(3, 4, np.random.default_rng(0))


def test_curve_is_the_mean_and_std_over_seeds():
    from vpeft.active import curve

    rows = [
        {"strategy": "star", "labelled": 4, "accuracy": 50.0},
        {"strategy": "star", "labelled": 4, "accuracy": 60.0},
        {"strategy": "star", "labelled": 8, "accuracy": 70.0},
        {"strategy": "random", "labelled": 4, "accuracy": 1.0},
    ]
    assert curve(rows) == {"star": [(4, 55.0, 5.0, 2), (8, 70.0, 0.0, 1)], "random": [(4, 1.0, 0.0, 1)]}


def test_b_decay_is_adamw_decoupled_decay_on_b_alone():
    lr, decay = 0.01, 0.5
    model = tiny_llama()
    vpeft.apply_method(model, "lora", plugins=[{"name": "lora_b_decay", "weight_decay": decay}])
    layers = [a.parts[WHOLE] for a in adapted_modules(model, "default") if not a.head]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(0, 0.1)  # B != 0, so that its decay shows
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, "adamw", lr=lr, weight_decay=0.0)
    b_ids = {id(layer.lora_B) for layer in layers}
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert groups[decay] == b_ids  # B alone decays; A and the rest take the run's 0
    loss, _ = task_loss(model, batches(1)[0])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = grads[name]
        step = lr * g / (g.abs() + 1e-8)  # Adam's first step: m_hat = g, v_hat = g^2
        shrink = 1 - lr * decay if id(p) in b_ids else 1.0
        torch.testing.assert_close(p.detach(), before[name] * shrink - step, rtol=1e-5, atol=1e-7)


def test_b_decay_refuses_a_method_without_b():
    with pytest.raises(ConfigError, match="lora_b_decay"):
        vpeft.apply_method(tiny_llama(), "ia3", plugins=[{"name": "lora_b_decay"}])


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny BERT folder and a three-colour jsonl task: 16 train items, 6 test items."""
    from .lm.test_text_tasks import bert_folder, label_rows, write_jsonl

    root = tmp_path_factory.mktemp("star")
    bert = bert_folder(root / "bert")
    rows = {"train": label_rows(16), "val": label_rows(3, 3), "test": label_rows(6, 5)}
    data = write_jsonl(root / "data", rows)
    config = root / "text.yaml"
    config.write_text(f"""
task: text_classification
model: {{name: "hf:{bert}"}}
method: {{name: lora, r: 2}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0}}
optim: {{lr: 1.0e-2, weight_decay: 0.0}}
train: {{epochs: 1, log_every: 1, tensorboard: false, seed: 0}}
""")
    return config


def labelled_texts(run_dir):
    return [json.loads(line)["text"] for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]


def test_loop_bookkeeping(tiny_text, tmp_path):
    from vpeft.active import run_active

    rows = run_active(tiny_text, [], tmp_path / "al", ["star", "entropy"], [0], Budget(4, 3, 3), report=lambda _: 0)
    assert [(r["strategy"], r["round"], r["labelled"]) for r in rows] == [
        (s, i, 4 + 3 * i) for s in ("star", "entropy") for i in range(3)
    ]
    assert [json.loads(line) for line in (tmp_path / "al" / "results.jsonl").read_text().splitlines()] == rows
    for strategy in ("star", "entropy"):
        mine = [r for r in rows if r["strategy"] == strategy]
        added = [i for r in mine for i in r["added"]]
        assert len(added) == len(set(added)) == 4 + 3 * 2  # no item labelled twice
        assert [len(r["added"]) for r in mine] == [4, 3, 3]
        last = tmp_path / "al" / "seed0" / strategy / "round2"
        # the last round trains on exactly the items labelled so far (texts repeat: compare as multisets)
        pool = [json.loads(line)["text"] for line in (tiny_text.parent / "data" / "train.jsonl").open()]
        assert sorted(labelled_texts(last)) == sorted(pool[i] for i in added)
        summary = json.loads((last / "run" / "summary.json").read_text())
        assert summary["plugins"] == (["lora_b_decay"] if strategy == "star" else [])
    first = {r["strategy"]: r["added"] for r in rows if r["round"] == 0}
    assert first["star"] == first["entropy"]  # one initial set per seed, whatever the strategy
    assert (tmp_path / "al" / "curve.png").stat().st_size > 1000


def test_random_strategy_is_reproducible_by_seed(tiny_text, tmp_path):
    from vpeft.active import run_active

    def picks(out, seed):
        rows = run_active(tiny_text, [], tmp_path / out, ["random"], [seed], Budget(3, 4, 2), report=lambda _: 0)
        return [r["added"] for r in rows]

    first = picks("a", 5)
    assert first == picks("b", 5)
    assert first != picks("c", 6)


class Killed(Exception):
    pass


def test_resume_continues_where_an_interrupted_call_stopped(tiny_text, tmp_path):
    from vpeft.active import run_active

    def same(rows):
        return [{k: v for k, v in r.items() if k not in ("run_dir", "seconds", "selection_seconds")} for r in rows]

    args = (["star", "random"], [1], Budget(4, 3, 3))
    whole = run_active(tiny_text, [], tmp_path / "a", *args, report=lambda _: 0)

    def dies_after_two(line, seen=[]):  # noqa: B006  (a counter that lives across the calls)
        seen.append(line)
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_active(tiny_text, [], tmp_path / "b", *args, report=dies_after_two)
    cut = tmp_path / "b" / "seed1" / "star" / "round2" / "run"
    cut.mkdir(parents=True)
    (cut / "config.yaml").write_text("half-written")  # a round the interruption cut short
    with pytest.raises(ExistingPathError, match="--resume"):
        run_active(tiny_text, [], tmp_path / "b", *args, report=lambda _: 0)
    with pytest.raises(ConfigError, match="budget"):
        run_active(tiny_text, [], tmp_path / "b", ["star", "random"], [1], Budget(4, 2, 3), resume=True)
    resumed = []
    rows = run_active(tiny_text, [], tmp_path / "b", *args, report=resumed.append, resume=True)
    assert len(resumed) == 4  # star's third round and random's three; the two finished rounds are kept
    assert same(rows) == same(whole)
    assert same(json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()) == same(whole)


def tool(*argv):
    from tools import star

    return cli.run(star.main, [str(a) for a in argv])


def test_cli_refusals(tiny_text, tmp_path, capsys):
    out = tmp_path / "x"
    assert tool(tiny_text, "--out", out, "--strategies", "star", "bald") == 2
    assert "'bald' is not a selection strategy; choose from star, random, entropy" in capsys.readouterr().err
    assert tool(tiny_text, "--out", out, "--initial", 10, "--k", 4, "--rounds", 3) == 2
    err = capsys.readouterr().err
    assert "labels 18 items" in err and "16 items of the train split" in err
    assert tool(tiny_text, "--out", out, "--set", "task=causal_lm") == 2
    assert "task is 'causal_lm'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    out.mkdir()
    (out / "results.jsonl").write_text("")
    assert tool(tiny_text, "--out", out, "--initial", 2, "--k", 1, "--rounds", 1) == 2
    assert "not empty" in capsys.readouterr().err


def test_calls_of_disjoint_seeds_merge_into_one_result_set(tiny_text, tmp_path, capsys):
    from vpeft.active import run_active

    parts = [tmp_path / f"s{seed}" for seed in (0, 1)]
    rows = []
    for seed, part in enumerate(parts):  # one call per seed, as one per core or machine
        rows += run_active(tiny_text, [], part, ["random"], [seed], Budget(3, 4, 2), report=lambda _: 0)
    assert tool("--merge", *parts, "--out", tmp_path / "all") == 0
    merged = [json.loads(x) for x in (tmp_path / "all" / "results.jsonl").read_text().splitlines()]
    assert merged == rows
    request = json.loads((tmp_path / "all" / "request.json").read_text())
    assert request == {**json.loads((parts[0] / "request.json").read_text()), "seeds": [0, 1]}
    assert (tmp_path / "all" / "curve.png").stat().st_size > 1000
    assert tool("--merge", parts[0], parts[0], "--out", tmp_path / "twice") == 2
    assert "some seeds twice" in capsys.readouterr().err
    run_active(tiny_text, [], tmp_path / "other", ["random"], [2], Budget(3, 3, 2), report=lambda _: 0)
    assert tool("--merge", parts[0], tmp_path / "other", "--out", tmp_path / "mixed") == 2
    assert "differ in ['budget']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse's usage error: exit status 2, the line printed
        tool(tiny_text, "--merge", parts[0], "--out", tmp_path / "both")
    assert usage.value.code == 2 and "not both" in capsys.readouterr().err
