"""Changing the trainable set during training (vpeft/core/control.py): the optimiser's state follows a resized
parameter, a frozen tensor keeps its moments, loop callbacks see the step, batch and validation data, and a run whose
controller pruned or grew its adapter resumes bit-identically after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import StepContext, gather
from vpeft.engine import train as engine

from ..conftest import killed_at_epoch
from ..lm.test_text_tasks import causal_config, lemma_rows, llama_folder, write_jsonl


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def lemma_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lemmas"), {"train": lemma_rows(12), "val": lemma_rows(4, 3),
                                                         "test": lemma_rows(6, 5)})  # fmt: skip


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gather_reindexes_per_dimension_and_fills_new_entries():
    old = torch.arange(12.0).view(3, 4)
    rows, cols = torch.tensor([2, -1, 0]), torch.tensor([1, 3, -1])
    fill = torch.full((3, 3), -7.0)
    out = gather(old, (rows, cols), fill)
    for i, r in enumerate(rows.tolist()):
        for j, c in enumerate(cols.tolist()):
            assert out[i, j] == (-7.0 if r < 0 or c < 0 else old[r, c])
    assert torch.equal(gather(old, (None, torch.tensor([3, 0]))), old[:, [3, 0]])


def test_adamw_moments_of_surviving_entries_are_kept_and_pruned_ones_dropped():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        layer(torch.randn(8, 5)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    before = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    old_weight = layer.weight.detach().clone()
    ctx = StepContext(layer, 3, 10)
    keep = torch.tensor([3, 1, -1])  # rows 0 and 2 pruned, row 3 and 1 kept (reordered), one new row
    new = ctx.resize(layer, "weight", (keep, None), torch.zeros(3, 5))
    ctx.follow(optimizer)
    assert layer.weight is new and any(p is new for g in optimizer.param_groups for p in g["params"])
    state = optimizer.state[new]
    assert torch.equal(state["exp_avg"][:2], before["exp_avg"][[3, 1]]) and not state["exp_avg"][2].any()
    assert torch.equal(state["exp_avg_sq"][:2], before["exp_avg_sq"][[3, 1]]) and not state["exp_avg_sq"][2].any()
    assert torch.equal(state["step"], before["step"])  # the scalar state is kept
    assert torch.equal(new.detach()[:2], old_weight[[3, 1]]) and not new.detach()[2].any()
    # the next step is AdamW's with those moments: computed here by hand for the kept rows
    layer.bias.requires_grad_(False)  # frozen: skipped by AdamW, state kept
    bias_state = {k: v.clone() for k, v in optimizer.state[layer.bias].items()}
    bias = layer.bias.detach().clone()
    x = torch.randn(8, 5)
    torch.nn.functional.linear(x, layer.weight, layer.bias[:3]).square().sum().backward()
    grad = layer.weight.grad.clone()
    lr, (b1, b2), eps, wd = 0.1 / 4, (0.9, 0.999), 1e-8, 0.01
    m = b1 * state["exp_avg"] + (1 - b1) * grad
    v = b2 * state["exp_avg_sq"] + (1 - b2) * grad.square()
    step = float(before["step"]) + 1
    expected = new.detach() * (1 - lr * wd) - lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    optimizer.step()
    assert torch.allclose(layer.weight.detach(), expected, atol=1e-6)
    assert torch.equal(layer.bias.detach(), bias)
    assert all(torch.equal(optimizer.state[layer.bias][k], bias_state[k]) for k in bias_state)


def test_callbacks_see_the_step_batch_loss_and_validation_data(tmp_path, llama_dir, lemma_data, one_thread):
    seen = []

    def callback(ctx: StepContext):
        val = ctx.val_batch(ctx.step)
        seen.append((ctx.step, ctx.total_steps, float(ctx.loss(ctx.batch).detach()), float(ctx.loss(val).detach())))
        return "looked" if ctx.step == 2 else None

    cfg = causal_config(tmp_path, llama_dir, lemma_data)
    engine.train(cfg, tmp_path / "run", callbacks=(callback,))
    assert [s[:2] for s in seen] == [(s, 6) for s in range(6)]
    lines = [r for r in records(tmp_path / "run") if "change" in r]
    assert lines == [{"step": 2, "epoch": 1, "trainable": 2 * 4 * ((32 + 32) + (32 + 16)), "change": "looked"}]
    plain = engine.train(cfg, tmp_path / "plain")  # a callback that only looks changes nothing
    assert [r for r in records(tmp_path / "plain")] == [r for r in records(tmp_path / "run") if "change" not in r]
    assert plain["test"] == json.loads((tmp_path / "run" / "summary.json").read_text())["test"]


@pytest.mark.parametrize(
    "method",
    [
        # grows at steps 1, 2 (epoch 1, before the checkpoint) and 3, 4, 5 (after the resume)
        [
            "method.name=triadapt_lora",
            "method.r=2",
            "method.alpha=2",
            "method.r_max=6",
            "method.grow_by=1",
            "method.grow_every=1",
            "method.grow_start=0.1",
            "method.grow_end=0.9",
            "method.threshold_start=0.5",
            "method.threshold_end=0.1",
        ],
        # the gates learn on steps 0-3 (across the resume) and the modules are pruned at step 4
        ["method.name=diffora", "method.r=4", "method.search=0.6", "method.gate_lr=1.0"],
        ["method.name=ist", "method.r=4", "method.fraction=0.5", "method.update_every=2"],
        # importance recorded at step 1; heads, neurons, modules and ranks pruned at step 2 (before the checkpoint):
        # the resumed run prunes a fresh base model to the saved structure before loading its tensors
        ["method.name=light_peft", "method.r=4", "method.estimate=0.3", "method.head_ratio=0.5"],
    ],
    ids=["triadapt_lora", "diffora", "ist", "light_peft"],
)
def test_a_controlled_run_killed_and_resumed_equals_the_whole_run(method, tmp_path, llama_dir, lemma_data, one_thread):
    cfg = causal_config(tmp_path, llama_dir, lemma_data, *method, "data.val_split=null")
    whole = engine.train(cfg, tmp_path / "whole")
    with killed_at_epoch(1):  # after the first epoch's checkpoint, written after the first changes
        engine.train(cfg, tmp_path / "split")
    resumed = engine.train(cfg, tmp_path / "split", resume=True)
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert resumed["test"] == whole["test"]
    a = (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "split" / "adapter" / "adapter_model.safetensors").read_bytes() == a
    changes = [r for r in records(tmp_path / "whole") if "change" in r]
    assert changes and all(r["trainable"] > 0 for r in changes)
    # the saved adapter rebuilds at its final shapes, and its trainable count is the summary's
    saved = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    scores = 4 if "ist" in method[0] else 0  # IST's saved importance score per target is a buffer, not trained
    assert saved["num_parameters"] == whole["final_trainable_params"] + scores
    import tools.test as test_tool

    test_tool.main([str(tmp_path / "whole")])
    again = json.loads((tmp_path / "whole" / "test_metrics.json").read_text())
    assert again["loss"] == pytest.approx(whole["test"]["loss"], rel=1e-5)
    if "triadapt_lora" in method[0]:
        ranks = saved["options"]["ranks"]
        assert max(ranks) > 2 and whole["final_trainable_params"] == sum(
            r * (32 + out) + r * r for r, out in zip(ranks, [32, 16] * 2, strict=True)
        )
        assert changes[-1]["trainable"] == whole["final_trainable_params"]
    if "light_peft" in method[0]:
        assert [r["step"] for r in changes] == [2] and saved["options"]["pruned"]
        options = saved["options"]
        q = [8 * len(h.split(",")) for h in options["heads"]]  # rows of q, columns of o: 8 per kept query head
        n = [bin(int(m, 16)).count("1") for m in options["neurons"]]  # kept FFN neurons
        widths = [32 + w for w in q] + [32 + 16] * 4 + [w + 32 for w in q] + [32 + w for w in n] * 2  # in + out
        assert q == [16, 16]  # half of the 4 heads pruned: one kept in each of the 2 key/value groups
        assert (
            changes[0]["trainable"]
            == whole["final_trainable_params"]
            == sum(r * w for r, w in zip(options["ranks"], widths, strict=True))
        )
    if "diffora" in method[0]:
        assert [r["step"] for r in changes] == [4] and saved["options"]["discretised"]
        assert sorted(set(saved["options"]["ranks"])) == [0, 4]


def test_vpeft_control_runs_the_method_hook_then_the_callbacks(one_thread):
    from ..lm.models import tiny_llama

    model = tiny_llama()
    vpeft.apply_method(model, "ist", r=2, fraction=0.5)
    order = []
    ctx = StepContext(model, 0, 4)
    notes = vpeft.control(model, ctx, [lambda c: order.append(c.step) or "cb"])
    assert notes[0].startswith("ist trains blocks") and notes[1] == "cb" and order == [0]
    trains = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert len(trains) == 1  # one of the two blocks
