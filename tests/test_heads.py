"""vpeft.core.head_layout and HeadLayout: which rows of q, k, v and which input columns of the output projection belong
to a head, checked against what the models themselves compute: changing the rows the layout gives for one head changes
that head's attention pattern and no other (q, k; with grouped-query attention, the whole group reading a key/value
head), and silencing a head's value rows equals silencing its output-projection columns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vpeft.core import HeadLayout, head_layout, weight_and_bias

from .conftest import tiny_vit
from .lm.models import TINY_LMS, batches

# model -> (q, k, v, output projection) paths of block 0, and the fused projection's slices where there is one
PATHS = {
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.0.self_attn.o_proj"),
    "bert": ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
             "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.attention.output.dense"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn",
             "transformer.h.0.attn.c_proj"),
}  # fmt: skip
LAYOUTS = {"llama": (4, 2, 8), "bert": (2, 2, 16), "gpt2": (2, 2, 16)}


def test_rows_of_a_head_by_hand_with_grouped_query_attention():
    smollm2 = HeadLayout(num_heads=9, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
    assert smollm2.width("q") == smollm2.width("out") == 576 and smollm2.width("k") == smollm2.width("v") == 192
    assert smollm2.indices("q", [4]).tolist() == list(range(256, 320))
    assert smollm2.indices("out", [4, 0]).tolist() == list(range(0, 64)) + list(range(256, 320))
    assert smollm2.indices("k", [4]).tolist() == list(range(64, 128))  # query heads 3, 4, 5 read key/value head 1
    assert smollm2.indices("v", [3, 5, 8]).tolist() == list(range(64, 192))  # heads 1 and 2, each once
    with pytest.raises(ValueError, match="head 9 does not exist"):
        smollm2.indices("q", [9])


@pytest.mark.parametrize("lm", sorted(PATHS))
def test_layout_is_read_from_each_model(lm):
    model = TINY_LMS[lm]()
    for path in PATHS[lm]:
        assert head_layout(model, path) == HeadLayout(*LAYOUTS[lm])


def test_layout_of_a_timm_vit_and_of_nn_multihead_attention():
    assert head_layout(tiny_vit(), "blocks.1.attn.proj") == HeadLayout(2, 2, 32)
    holder = nn.Sequential(nn.MultiheadAttention(12, 3))
    assert head_layout(holder, "0.out_proj") == HeadLayout(3, 3, 4)
    assert head_layout(nn.Sequential(nn.Linear(4, 4)), "0") is None


def _weight(model: nn.Module, lm: str, part: str) -> torch.Tensor:
    """The (out, in) view of block 0's projection ``part`` (q, k, v, out) that writes through to the model."""
    module = model.get_submodule(PATHS[lm]["qkvo".index(part[0])])
    weight, _ = weight_and_bias(module)
    if lm == "gpt2" and part != "out":  # the fused c_attn: q, k, v are thirds of its output rows
        d = weight.shape[0] // 3
        return weight["qkv".index(part) * d : ("qkv".index(part) + 1) * d]
    return weight


def _attention(model: nn.Module) -> torch.Tensor:
    batch = batches(1, seed=2)[0]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    return out.attentions[0]  # block 0: (batch, heads, query, key)


@pytest.mark.parametrize("lm", sorted(PATHS))
@pytest.mark.parametrize("part", ["q", "k"])
def test_the_rows_of_a_head_move_that_head_s_attention_only(lm, part):
    model = TINY_LMS[lm]()
    model.set_attn_implementation("eager")  # attention probabilities are returned by the eager kernel
    layout = head_layout(model, PATHS[lm][0])
    before = _attention(model)
    head = layout.num_heads - 1
    with torch.no_grad():
        rows = layout.indices(part, [head])
        _weight(model, lm, part)[rows] *= 3.0
    changed = {h for h in range(layout.num_heads) if not torch.allclose(_attention(model)[:, h], before[:, h])}
    group = layout.num_heads // layout.num_kv_heads
    expected = {head} if part == "q" else {h for h in range(layout.num_heads) if h // group == head // group}
    assert changed == expected


@pytest.mark.parametrize("lm", sorted(PATHS))
def test_silencing_a_head_s_value_rows_equals_silencing_its_output_columns(lm):
    base = TINY_LMS[lm]()
    layout = head_layout(base, PATHS[lm][0])
    kv_head = layout.num_kv_heads - 1
    group = layout.num_heads // layout.num_kv_heads
    readers = [h for h in range(layout.num_heads) if h // group == kv_head]  # the query heads that read it
    no_value, no_output = TINY_LMS[lm](), TINY_LMS[lm]()
    with torch.no_grad():
        _weight(no_value, lm, "v")[layout.indices("v", readers)] = 0
        if lm != "llama":  # the value bias would still pass through the softmax-weighted sum
            module = no_value.get_submodule(PATHS[lm][2])
            bias = module.bias[2 * module.bias.shape[0] // 3 :] if lm == "gpt2" else module.bias
            bias[layout.indices("v", readers)] = 0
        _weight(no_output, lm, "out")[:, layout.indices("out", readers)] = 0
    batch = batches(1, seed=2)[0]
    with torch.no_grad():
        outs = [
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for m in (no_value, no_output, base)
        ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0], outs[2])
