"""The controllers' math against independent computations: IST's suppression scores and draws, TriAdaptLoRA's
importance, growth and threshold schedule, DiffoRA's gate step (finite differences, float64) and discretisation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vpeft
from vpeft.core import StepContext, layers_of
from vpeft.methods import diffora, ist, triadapt_lora

from ..conftest import perturb
from ..lm.models import batches, task_loss, tiny_bert, tiny_llama


def loss_of(model):
    return lambda batch: task_loss(model, batch)[0]


def test_ist_scores_are_the_loss_increase_when_a_block_is_suppressed(one_thread):
    model = tiny_llama()
    vpeft.apply_method(model, "ist", r=4, dropout=0.0, fraction=0.5, momentum=0.75)
    perturb(model)
    batch = batches(1)[0]
    layers = layers_of(model, "default")
    config = vpeft.core.adapter_record(model).config
    ist.update_scores(config, ist.blocks_of(layers), [0, 1], StepContext(model, 10, 20, batch, loss_of(model)))
    with torch.no_grad():
        base = float(task_loss(model, batch)[0])
        for block in (0, 1):  # independently: the block's adapters removed from a copy (B = 0)
            other = copy.deepcopy(model)
            for n, p in other.named_parameters():
                if f"layers.{block}." in n and n.endswith("lora_B"):
                    p.zero_()
            delta = float(task_loss(other, batch)[0]) - base
            assert ist.scores(layers)[block] == pytest_approx(0.25 * delta)


def pytest_approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-7)


def test_ist_draws_follow_the_standardised_softmax_and_frozen_blocks_keep_their_state(one_thread):
    config = ist.ISTConfig(fraction=0.25, temperature=0.5)
    scores = torch.tensor([0.0, 1.0, 3.0, -1.0], dtype=torch.float64)
    z = (scores - scores.mean()) / (scores.std() * 0.5)
    expected = torch.exp(z) / torch.exp(z).sum()
    assert torch.allclose(ist.probabilities(config, scores), expected)
    assert torch.equal(ist.probabilities(config, torch.zeros(4)), torch.full((4,), 0.25))

    model = tiny_llama(layers=4)
    vpeft.apply_method(model, "ist", r=2, dropout=0.0, fraction=0.25)
    layers = layers_of(model, "default")
    for layer in layers:
        layer.ist_score.fill_(float(scores[layer.block]))
    counts = torch.zeros(4)
    for step in range(400):
        (chosen,) = ist.draw_blocks(config, ist.blocks_of(layers), step)
        counts[chosen] += 1
    assert torch.allclose(counts / 400, expected.float(), atol=0.06)  # 400 draws: SE <= 0.025

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batches(1)[0]
    task_loss(model, batch)[0].backward()  # every block takes a first step
    optimizer.step()
    optimizer.zero_grad()
    ctx = StepContext(model, 1, 10, batch, loss_of(model))
    note = vpeft.control(model, ctx)
    trained = {int(b) for b in note[0].split("[")[1].rstrip("]").split(",")}
    frozen = {n: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
              for n, p in model.named_parameters() if "adapters" in n and not p.requires_grad}  # fmt: skip
    assert len(trained) == 1 and frozen
    task_loss(model, batch)[0].backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for n, (value, state) in frozen.items():
        assert params[n].grad is None and torch.equal(params[n].detach(), value)
        assert all(torch.equal(optimizer.state[params[n]][k], v) for k, v in state.items())


def test_triadapt_importance_growth_and_threshold(one_thread):
    model = tiny_llama()
    vpeft.apply_method(model, "triadapt_lora", r=2, alpha=2.0, dropout=0.0, r_max=4, grow_by=2)
    perturb(model)
    layers = layers_of(model, "default")
    layer = layers[0]
    a, b, t = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_T.detach()
    lower = torch.tensor([[t[0, 0], 0.0], [t[1, 0], t[1, 1]]])  # the triangular core, written out
    delta = b @ lower @ a
    assert layer.importance() == pytest_approx(float(delta.norm()) / math.sqrt(delta.numel()))
    assert torch.allclose(layer.delta_weight(), 1.0 * delta, atol=1e-6)

    x = torch.randn(3, 5, 32)
    before = [lay.adapt_output(x, torch.zeros(3, 5, lay.lora_B.shape[0])) for lay in layers]
    config = triadapt_lora.TriAdaptLoRAConfig(r=2, r_max=4, grow_by=2, grow_every=1, grow_start=0.1, grow_end=0.9,
                                              threshold_start=0.5, threshold_end=0.5)  # fmt: skip
    ctx = StepContext(model, 5, 10)
    vpeft.core.adapter_record(model).config = config
    note = vpeft.control(model, ctx)
    scores = [lay.importance() for lay in layers]
    assert note and all(
        (lay.rank == 4) == (s / max(scores) >= 0.5) for lay, s in zip(layers, scores, strict=True)
    )  # scores unchanged by growth: the new B columns are zero
    after = [lay.adapt_output(x, torch.zeros(3, 5, lay.lora_B.shape[0])) for lay in layers]
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(before, after, strict=True))
    assert vpeft.core.adapter_record(model).config.ranks == tuple(lay.rank for lay in layers)
    # the threshold rises linearly between grow_start and grow_end, on growth steps only
    schedule = triadapt_lora.TriAdaptLoRAConfig(grow_every=10, grow_start=0.1, grow_end=0.5, threshold_start=0.9,
                                                threshold_end=0.5)  # fmt: skip
    assert triadapt_lora.threshold(schedule, 15, 100) is None and triadapt_lora.threshold(schedule, 60, 100) is None
    assert triadapt_lora.threshold(schedule, 30, 100) == pytest_approx(0.9 - 0.4 * 20 / 40)


def test_diffora_gate_step_is_the_validation_gradient_and_discretisation_keeps_the_top_gates(one_thread):
    model = tiny_bert().double()  # float64 throughout (Llama's RoPE and softmax run in float32)
    vpeft.apply_method(model, "diffora", r=2, dropout=0.0, keep=0.25, search=0.5, gate_lr=0.5)
    perturb(model)
    layers = layers_of(model, "default")
    train_batch, val_batch = batches(2)
    ctx = StepContext(model, 0, 10, train_batch, loss_of(model), lambda i: val_batch)
    gates = [float(layer.gate.detach()) for layer in layers]
    eps, numeric = 1e-5, []
    for layer in layers:  # central differences of the validation loss in each gate
        with torch.no_grad():
            layer.gate += eps
            up = float(task_loss(model, val_batch)[0])
            layer.gate -= 2 * eps
            down = float(task_loss(model, val_batch)[0])
            layer.gate += eps
        numeric.append((up - down) / (2 * eps))
    assert vpeft.control(model, ctx) == []  # a search step changes no tensor's shape
    for layer, g, d in zip(layers, gates, numeric, strict=True):
        assert float(layer.gate.detach()) - g == pytest.approx(-0.5 * d, rel=1e-4, abs=1e-12)

    for i, layer in enumerate(layers):  # distinct gates, so the ranking is known
        with torch.no_grad():
            layer.gate.fill_(0.1 * i - 0.5 * (i % 3))
    order = sorted(range(len(layers)), key=lambda i: -float(layers[i].gate))
    keep = set(order[: math.ceil(0.25 * len(layers))])
    reference = copy.deepcopy(model)  # independently: the dropped modules' update removed, the kept ones' as they are
    for i, layer in enumerate(layers_of(reference, "default")):
        if i not in keep:
            with torch.no_grad():
                layer.lora_B.zero_()
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        expected = task_loss(reference, batch)[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ctx = StepContext(model, 5, 10, train_batch, loss_of(model), lambda i: val_batch)
    (note,) = vpeft.control(model, ctx)
    ctx.follow(optimizer)
    assert note.startswith(f"diffora kept {len(keep)} of {len(layers)}")
    assert [layer.lora_A.shape[0] for layer in layers] == [2 if i in keep else 0 for i in range(len(layers))]
    assert all(layer.gate.numel() == 0 for layer in layers)
    with torch.no_grad():
        assert torch.allclose(task_loss(model, batch)[1], expected, atol=1e-10)
    assert vpeft.core.adapter_record(model).config.discretised
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(layer.lora_A) in held and id(layer.gate) in held for layer in layers)
    assert diffora.search_steps(vpeft.core.adapter_record(model).config, 10) == 5
