"""Light-PEFT against independent computations: the masked forward equals the base model with its output-projection
columns scaled by hand; the module and rank importance equal hand-computed norms and finite differences (float64);
the pruning decision picks the smallest scores; physical pruning gives the logits of the masked model with the
pruned masks (heads, neurons, ranks) at 0 and the kept ones at 1, with the parameter count falling by what the pruned
rows and columns hold (tiny BERT, tiny Llama with grouped-query attention), and a saved pruned adapter rebuilds the
pruned model from a fresh one."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import StepContext, adapter_record, layers_of, lr_multipliers
from vpeft.methods import light_peft

from ..conftest import perturb
from ..lm.models import batches, task_loss, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = {"bert": tiny_bert, "llama": tiny_llama}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def attention_blocks(model):
    """(attention output projection, FFN down projection, head width) of each block, as the base model names them."""
    if hasattr(model, "bert"):
        return [(b.attention.output.dense, b.output.dense, 16) for b in model.bert.encoder.layer]
    return [(b.self_attn.o_proj, b.mlp.down_proj, 8) for b in model.model.layers]


def base_linear(module):
    return getattr(module, "base_layer", module)


def masked(name, **options):
    base = MODELS[name]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "light_peft", dropout=0.0, **options)
    return base, model


@pytest.mark.parametrize("name", MODELS)
def test_masked_forward_equals_the_base_with_columns_scaled_by_hand(name):
    base, model = masked(name)
    g = torch.Generator().manual_seed(1)
    layers = layers_of(model, "default")
    with torch.no_grad():
        for layer in layers:  # masks in [0, 2), some exactly 0 (a head or neuron pruned by its mask)
            for m in layer.masks().values():
                m.copy_(2 * torch.rand(m.shape, generator=g) * (torch.rand(m.shape, generator=g) > 0.2))
    masks = {(layer.path, name[0]): m for layer in layers for name, m in layer.masks().items()}
    hand = copy.deepcopy(base)
    with torch.no_grad():
        for (o, down, width), (o_path, down_path) in zip(attention_blocks(hand), paths(hand), strict=True):
            o.weight.mul_(masks[o_path, "a"].repeat_interleave(width))  # P_h V_h scaled by m_h: its columns of W_o
            down.weight.mul_(masks[down_path, "f"])
    batch = batches(1, seed=2)[0]
    torch.testing.assert_close(logits(model, batch), logits(hand, batch), rtol=1e-5, atol=1e-6)
    # the L1 term and the masks' learning-rate multipliers
    expected = 1e-4 * sum(float(m.detach().abs().sum()) for m in masks.values())
    assert float(vpeft.method_loss(model).detach()) == pytest.approx(expected, rel=1e-6)
    factors = lr_multipliers(model)
    assert {factors[id(layer.attn_mask)] for layer in layers if layer.role == "o"} == {100.0}
    assert {factors[id(layer.ffn_mask)] for layer in layers if layer.role == "out"} == {50.0}
    assert len(factors) == 2 * 2 and {layer.role for layer in layers if layer.masks()} == {"o", "out"}


def paths(model):
    """Logical paths of each block's attention output and FFN down projection (the targets that hold the masks)."""
    if hasattr(model, "bert"):
        return [(f"bert.encoder.layer.{i}.attention.output.dense", f"bert.encoder.layer.{i}.output.dense")
                for i in range(len(model.bert.encoder.layer))]  # fmt: skip
    return [(f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj") for i in range(2)]


def test_module_and_rank_importance_by_hand():
    _, model = masked("bert")
    model.double()
    perturb(model)
    layers = layers_of(model, "default")
    seen = {}
    hooks = [base_linear(m).register_forward_hook(lambda mod, i, o, key=key: seen.__setitem__(key, (i[0], o)))
             for key, m in wrapped(model).items()]  # fmt: skip
    for layer in layers:
        layer.recording = True
    model.train()
    batch = batches(1, seed=3)[0]
    loss = task_loss(model, batch)[0]
    for h in hooks:
        h.remove()
    for layer in layers:
        x, y = seen[layer.path]  # the base layer's input (the masked x) and output (W0 x + b)
        update = layer.scale * x @ layer.lora_A.detach().T @ layer.lora_B.detach().T
        expected = (update.norm(dim=-1) / y.norm(dim=-1)).mean()
        assert float(layer.module_score[0]) == pytest.approx(float(expected.detach()), rel=1e-9)
        assert float(layer.module_score[1]) == 1
    loss.backward()
    config = adapter_record(model).config
    start, end = light_peft.recording_steps(config, 100)
    vpeft.on_step(model, start, 100)
    for layer in layers[:3]:  # |dL/dg_i| at g = 1, g scaling rank i: central differences in float64
        for i in range(config.r):
            assert float(layer.rank_score[i]) == pytest.approx(abs(rank_derivative(model, layer, i, batch)), rel=1e-6,
                                                               abs=1e-10)  # fmt: skip
        assert float(layer.rank_score[-1]) == 1
    vpeft.on_step(model, end, 100)  # outside the second half of the estimation: nothing is added
    assert float(layers[0].rank_score[-1]) == 1


def wrapped(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "base_layer") and type(m).__name__ == "Adapted"}


def rank_derivative(model, layer, i, batch, eps=1e-4):
    values = []
    with torch.no_grad():
        row = layer.lora_A[i].clone()
        for sign in (1, -1):
            layer.lora_A[i] = row * (1 + sign * eps)
            values.append(float(task_loss(model, batch)[0]))
        layer.lora_A[i] = row
    return (values[0] - values[1]) / (2 * eps)


def test_the_decision_keeps_the_largest_masks_and_scores():
    _, model = masked("llama", head_ratio=0.5, neuron_ratio=0.25, module_ratio=0.5, rank_ratio=0.25)
    layers = layers_of(model, "default")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in layers:
            for m in layer.masks().values():
                m.copy_(torch.rand(m.shape, generator=g))
            layer.module_score.copy_(torch.tensor([float(torch.rand(1, generator=g)) * 3, 3.0]))
            layer.rank_score.copy_(torch.cat([torch.rand(layer.rank, generator=g) * 2, torch.tensor([2.0])]))
    config = adapter_record(model).config
    plan = light_peft.decide(config, layers, model)
    by_path = {layer.path: layer for layer in layers}
    for i, (o_path, _) in enumerate(paths(model)):
        m = by_path[o_path].attn_mask
        # 4 query heads in 2 key/value groups: half pruned keeps each group's largest mask
        assert plan.heads[i] == sorted(int(torch.argmax(m[g0 : g0 + 2])) + g0 for g0 in (0, 2))
    ffn = torch.cat([by_path[down].ffn_mask for _, down in paths(model)])
    threshold = ffn.sort().values[round(0.25 * ffn.numel()) - 1]
    kept = torch.cat([plan.neurons[0], plan.neurons[1] + 64])
    assert torch.equal(kept, (ffn > threshold).nonzero().flatten())
    scores = torch.tensor([float(x.module_score[0] / 3) for x in layers])
    removed = {j for j, r in enumerate(plan.ranks) if r.numel() == 0}
    assert removed == set(scores.argsort()[: len(layers) // 2].tolist())
    ranks = torch.cat([layers[j].rank_score[:-1] / 2 for j in sorted(set(range(len(layers))) - removed)])
    cut = ranks.sort().values[round(0.25 * ranks.numel()) - 1]
    kept = torch.cat([layers[j].rank_score[:-1][plan.ranks[j]] / 2 for j in sorted(set(range(len(layers))) - removed)])
    assert kept.numel() == ranks.numel() - round(0.25 * ranks.numel()) and bool((kept > cut).all())


@pytest.mark.parametrize("name", MODELS)
def test_physical_pruning_equals_the_masked_model_with_pruned_masks_at_zero(name, tmp_path):
    base, model = masked(name, head_ratio=0.5, neuron_ratio=0.4, module_ratio=0.25, rank_ratio=0.3)
    perturb(model)
    layers = layers_of(model, "default")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.module_score.copy_(torch.tensor([float(torch.rand(1, generator=g)), 1.0]))
            layer.rank_score.copy_(torch.cat([torch.rand(layer.rank, generator=g), torch.ones(1)]))
    config = adapter_record(model).config
    plan = light_peft.decide(config, layers, model)
    reference = copy.deepcopy(model)  # the masked model: kept masks at 1, pruned ones (and pruned ranks' B) at 0
    with torch.no_grad():
        block = {p: i for i, pair in enumerate(paths(reference)) for p in pair}
        for layer, ranks in zip(layers_of(reference, "default"), plan.ranks, strict=True):
            if layer.role == "o":
                layer.attn_mask.zero_()[plan.heads[block[layer.path]]] = 1
            if layer.role == "out":
                layer.ffn_mask.zero_()[plan.neurons[block[layer.path]]] = 1
            dropped = torch.ones(layer.rank, dtype=torch.bool)
            dropped[ranks] = False
            layer.lora_B[:, dropped] = 0
    before = base_count(model)
    ctx = StepContext(model, 4, 100)
    note = light_peft.prune_step(config, layers, ctx, plan)
    assert note.startswith("light_peft pruned")
    batch = batches(1, seed=6)[0]
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=1e-5, atol=1e-5)
    assert before - base_count(model) == removed_by_hand(base, plan)
    assert [layer.rank for layer in layers_of(model, "default")] == [r.numel() for r in plan.ranks]
    # a saved pruned adapter prunes a fresh base model the same way before loading its tensors
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), rtol=0, atol=0)
    # training goes on: every kept tensor still learns
    model.train()
    task_loss(model, batch)[0].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.numel())


def base_count(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)


def removed_by_hand(base, plan):
    """Weights and biases of the pruned heads' q/k/v rows and output columns, and of the pruned neurons' rows and
    columns, counted from the base model's shapes."""
    total = 0
    if hasattr(base, "bert"):
        for heads, neurons in zip(plan.heads, plan.neurons, strict=True):
            gone, width = 2 - len(heads), 16
            total += gone * width * (3 * (32 + 1) + 32)  # q, k, v rows with their bias; the output's columns
            total += (64 - neurons.numel()) * ((32 + 1) + 32)  # intermediate rows with bias; output columns
        return total
    for heads, neurons in zip(plan.heads, plan.neurons, strict=True):
        gone_q = 4 - len(heads)
        gone_kv = 2 - len({h // 2 for h in heads})
        total += gone_q * 8 * (32 + 32) + gone_kv * 8 * 32 * 2  # q rows and o columns; k and v rows of dropped groups
        total += (64 - neurons.numel()) * 32 * 3  # gate and up rows, down columns (no bias)
    return total
