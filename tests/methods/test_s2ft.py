"""S2FT against independent computations: the trained slices' gradient is the slice of the full weight gradient of a
plain autograd run (partial back-propagation), the merge is the slice added in place, the rows and columns are the
selected heads' and channels' by hand (GQA, GPT-2's fused Conv1D), the draw is the official script's, the count is by
hand, and a column target keeps only the selected inputs for its backward."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.core import WHOLE, adapted_modules, adapter_record, is_conv1d, layers_of
from vpeft.errors import ConfigError, OptionError

from ..conftest import perturb
from ..lm.models import TINY_LMS, batches, task_loss

pytestmark = pytest.mark.usefixtures("one_thread")

EVERY_KIND = {  # every structure each tiny LM has: q, k, v rows, output columns, FFN rows (up, gate) and columns
    "llama": ("q", "k", "v", "attn_out", "mlp_in", "gate_proj", "mlp_out"),
    "gpt2": ("q", "k", "v", "attn_out", "mlp_in", "mlp_out"),  # q, k, v: slices of the fused c_attn (Conv1D)
    "bert": ("q", "k", "v", "attn_out", "mlp_in", "mlp_out"),
}
HEAD_DIM = {"llama": 8, "gpt2": 16, "bert": 16}
GROUP = {"llama": 2, "gpt2": 1, "bert": 1}  # query heads per key/value head


def adapted(lm: str, **options) -> tuple[nn.Module, nn.Module]:
    base = TINY_LMS[lm]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "s2ft", **options)
    return base, model


def expected_index(lm: str, key: str, heads: list[int], channels: list[int]) -> tuple[str, list[int]]:
    """("rows" or "columns", indices) of a target, written out from the model's head sizes without vpeft's helper."""
    d, group = HEAD_DIM[lm], GROUP[lm]
    part = key[-2] if key.endswith("]") else None  # GPT-2's c_attn[q]
    for name, p in (("q_proj", "q"), ("query", "q"), ("k_proj", "k"), ("key", "k"), ("v_proj", "v"), ("value", "v")):
        part = part or (p if key.endswith(name) else None)
    if part is not None:
        own = sorted({h // group for h in heads}) if part in "kv" else heads
        return "rows", [h * d + i for h in own for i in range(d)]
    if key.endswith(("o_proj", "attention.output.dense", "attn.c_proj")):
        return "columns", [h * d + i for h in heads for i in range(d)]
    return ("columns" if key.endswith(("down_proj", "output.dense", "mlp.c_proj")) else "rows"), channels


def targets_and_views(lm: str, model: nn.Module, reference: nn.Module):
    """Per adapted target: its s2ft module, side, indices, and the (out, in) view of the reference model's weight."""
    record = adapter_record(model)
    pairs = [
        (a.path if p == WHOLE else f"{a.path}[{p}]", m)
        for a in adapted_modules(model, "default")
        for p, m in a.parts.items()
    ]
    assert sorted(key for key, _ in pairs) == sorted(record.targets)
    for key, layer in pairs:
        block = int(next(p for p in key.split(".") if p.isdigit()))
        heads = [h for b, h in record.config.heads if b == block]
        channels = [c for b, c in record.config.channels if b == block]
        side, index = expected_index(lm, key, heads, channels)
        module = reference.get_submodule(key.split("[")[0])
        weight = module.weight.T if is_conv1d(module) else module.weight
        if key.endswith("]"):
            d = weight.shape[0] // 3
            weight = weight["qkv".index(key[-2]) * d :][:d]
        yield key, layer, side, index, weight


@pytest.mark.parametrize("lm", sorted(EVERY_KIND))
def test_gradient_of_each_slice_is_that_slice_of_the_full_weight_gradient(lm):
    base, model = adapted(lm, targets=EVERY_KIND[lm], head_ratio=0.5, channel_ratio=0.1, head=())
    perturb(model)  # a trained state: the slices are no longer zero
    reference = copy.deepcopy(base)  # the unadapted model with W0 + S written into its weights, all trainable
    views = list(targets_and_views(lm, model, reference))
    with torch.no_grad():
        for key, layer, side, index, weight in views:
            assert layer.index.tolist() == index, key
            if side == "rows":
                weight[index] += layer.s2
            else:
                weight[:, index] += layer.s2
    reference.requires_grad_(True)
    batch = batches(1, seed=7)[0]
    model.train(), reference.train()
    loss, ref_loss = task_loss(model, batch)[0], task_loss(reference, batch)[0]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for key, layer, side, index, _ in views:
        module = reference.get_submodule(key.split("[")[0])
        full = module.weight.grad.T if is_conv1d(module) else module.weight.grad
        if key.endswith("]"):
            d = full.shape[0] // 3
            full = full["qkv".index(key[-2]) * d :][:d]
        expected = full[index] if side == "rows" else full[:, index]
        torch.testing.assert_close(layer.s2.grad, expected, rtol=0, atol=1e-6, msg=key)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)  # W0 gets none


@pytest.mark.parametrize("lm", sorted(EVERY_KIND))
def test_merge_adds_each_slice_in_place_exactly(lm):
    base, model = adapted(lm, targets=EVERY_KIND[lm], head_ratio=0.5, channel_ratio=0.1, head=())
    perturb(model)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for _, layer, side, index, weight in targets_and_views(lm, model, expected):
            if side == "rows":
                weight[index] += layer.s2
            else:
                weight[:, index] += layer.s2
    vpeft.merge(model)
    for (name, merged), (_, hand) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(merged, hand), name


def test_gqa_rows_and_parameter_count_by_hand():
    # SmolLM2-135M's attention and FFN shapes in two blocks: 9 query heads of 64 share 3 key/value heads
    config = TINY_LMS["llama"]().config.__class__(
        vocab_size=60, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64,
    )  # fmt: skip
    import transformers

    model = transformers.LlamaForCausalLM(config)
    report = vpeft.apply_method(model, "s2ft", targets=("q", "k", "attn_out", "mlp_out"), heads=((0, 4), (1, 0)))
    config = adapter_record(model).config
    n_channels = int(0.02 * 2 * 1536)  # the official int(ratio * layers * channels): 61
    assert config.heads == ((0, 4), (1, 0)) and len(config.channels) == n_channels and config.layout == (9, 3, 64)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.adapters["default"]["all"].index.tolist() == list(range(64, 128))  # head 4 reads kv head 1
    assert attn.q_proj.adapters["default"]["all"].index.tolist() == list(range(256, 320))
    # per selected head: q rows 64 x 576, k rows 64 x 576 (its kv head), o columns 576 x 64; per channel 576
    assert report.trainable == 2 * (64 * 576 + 64 * 576 + 576 * 64) + n_channels * 576 == 256_320


def test_the_draw_is_the_official_scripts_and_is_saved_with_the_adapter(tmp_path):
    base, model = adapted("llama", seed=5, head_ratio=0.3, channel_ratio=0.05)
    config = adapter_record(model).config
    rng = random.Random(5)  # finetune.py: sorted(random.sample(range(layers * units), int(layers * units * ratio)))
    heads = sorted(rng.sample(range(2 * 4), int(2 * 4 * 0.3)))
    channels = sorted(rng.sample(range(2 * 64), int(2 * 64 * 0.05)))
    assert config.heads == tuple((i // 4, i % 4) for i in heads)
    assert config.channels == tuple((i // 64, i % 64) for i in channels)
    perturb(model)
    vpeft.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["options"]
    assert [tuple(p) for p in saved["heads"]] == list(config.heads) and saved["layout"] == [4, 2, 8]
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "a")
    for mine, loaded in zip(layers_of(model, "default"), layers_of(fresh, "default"), strict=True):
        assert torch.equal(mine.index, loaded.index) and torch.equal(mine.s2, loaded.s2)
    other = adapter_record(adapted("llama", seed=6, head_ratio=0.3, channel_ratio=0.05)[1]).config
    assert (other.heads, other.channels) != (config.heads, config.channels)


def test_blocks_without_a_selected_unit_are_not_adapted():
    _, model = adapted("llama", heads=((1, 2),), channels=((1, 0), (1, 63)))
    assert adapter_record(model).targets == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


def test_a_column_target_keeps_only_the_selected_inputs_for_its_backward():
    _, model = adapted("llama", targets=("mlp_out",), channels=((0, 3), (0, 9)))
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = down(x)
    activations = [t for t in saved if not any(t is p or t._base is p for p in down.parameters())]
    assert max(t.numel() for t in activations) == 3 * 5 * 2  # x[..., C], not the 3 x 5 x 64 input
    y.sum().backward()
    torch.testing.assert_close(
        down.adapters["default"]["all"].s2.grad, y.new_ones(32, 3 * 5) @ x[..., [3, 9]].flatten(0, 1)
    )


def test_options_are_checked():
    with pytest.raises(OptionError, match=r"s2ft option heads lists \(block, index\) pairs .*\(1, 4\) is not one"):
        adapted("llama", heads=((1, 4),))
    with pytest.raises(OptionError, match="s2ft option channel_ratio must be in \\(0, 1\\)"):
        adapted("llama", channel_ratio=0.0)
    with pytest.raises(OptionError, match="pass the model's layout"):
        adapted("llama", layout=(2, 2, 8))  # 16 wide, where o_proj reads 32
    with pytest.raises(ConfigError, match="'lm_head' is neither an attention projection"):
        adapted("llama", targets=("lm_head",))


def test_forward_is_the_equation():
    base, model = adapted("gpt2", targets=("mlp_in",), channels=((0, 5), (0, 70)), head=())
    perturb(model)
    layer = model.transformer.h[0].mlp.c_fc.adapters["default"]["all"]
    x = torch.randn(4, 32)
    conv = base.transformer.h[0].mlp.c_fc  # Conv1D: y = x W + b with W (in, out)
    expected = x @ conv.weight + conv.bias
    expected[:, [5, 70]] += F.linear(x, layer.s2)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc(x), expected, rtol=1e-6, atol=1e-6)
