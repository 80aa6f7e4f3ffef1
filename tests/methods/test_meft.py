"""MEFT through the registered method on a tiny BERT: the forward pass is the coupling computed by hand with BERT's own
attention and feed-forward blocks (the adapters at their zero start), the gradients equal autograd's in float64 with
dropout on (each F and G replays its draws when recomputed), and the tensors kept for the backward pass do not grow
with the depth while LoRA's do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import layers_of

from ..conftest import perturb
from ..lm.models import batches, task_loss

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def bert(layers: int = 2, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def test_the_forward_pass_is_the_coupling_of_berts_own_blocks():
    base = bert()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "meft")
    batch = batches(1, seed=2)[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        captured = {}
        hook = base.bert.encoder.register_forward_pre_hook(
            lambda m, args, kwargs: captured.update(h=args[0], mask=kwargs["attention_mask"]), with_kwargs=True
        )
        base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hook.remove()
        x1 = x2 = captured["h"]
        for layer in base.bert.encoder.layer:  # y1 = 0.1 x1 + Attention(x2), y2 = 0.1 x2 + FeedForward(y1)
            y1 = 0.1 * x1 + layer.attention(x2, captured["mask"])[0]
            y2 = 0.1 * x2 + layer.feed_forward_chunk(y1)
            x1, x2 = y1, y2
        pooled = base.bert.pooler((x1 + x2) / 2)
        expected = base.classifier(pooled)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits, base(input_ids=batch["input_ids"]).logits)  # not BERT's own output


@pytest.mark.parametrize(("dropout", "lower"), [(0.0, None), (0.1, None), (0.1, 2)])
def test_gradients_equal_autograds_in_float64(dropout, lower):
    model = bert(layers=3, dropout=dropout).double()
    vpeft.apply_method(model, "meft", dropout=dropout, reversible_layers=lower)
    perturb(model)
    model.train()
    batch = batches(1, seed=3)[0]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(reversible: bool):
        layers_of(model, "default")[0].reversible = reversible
        torch.manual_seed(11)  # the same dropout draws in both runs
        loss = task_loss(model, batch)[0]
        return loss.detach(), torch.autograd.grad(loss, params)

    loss_rev, rev = grads(True)
    loss_ref, ref = grads(False)
    assert float(loss_rev) == pytest.approx(float(loss_ref), rel=1e-12)
    for a, b in zip(rev, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in rev)


def saved_bytes(model: nn.Module, batch: dict) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task_loss(model, batch)[0]
    return total


def test_kept_activations_do_not_grow_with_depth_while_loras_do():
    batch = batches(1, seed=4, batch=4, length=16)[0]
    counts = {}
    for method in ("meft", "lora"):
        for depth in (2, 6):
            model = bert(layers=depth)
            vpeft.apply_method(model, method)
            counts[method, depth] = saved_bytes(model, batch)
    # MEFT keeps the stack's outputs, whatever the depth; its frozen weights are not saved tensors of the graph
    assert counts["meft", 2] == counts["meft", 6]
    model = bert(layers=6)
    vpeft.apply_method(model, "meft", reversible_layers=4)  # the upper two layers keep theirs
    assert counts["meft", 6] < saved_bytes(model, batch) < counts["lora", 6]
    assert counts["lora", 6] > 2 * counts["lora", 2] and counts["lora", 6] > 3 * counts["meft", 6]
