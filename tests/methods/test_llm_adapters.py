"""LLM-Adapters' series and parallel bottleneck adapters as ``adapter`` and ``adaptformer`` placements: on one block
of the tiny Llama each adapter sits where its ``targets`` say (the block's output computed by hand from the base
block's modules and the adapter's matrices), and the paper's recipes keep the contract on the three tiny LMs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vpeft
from vpeft.errors import UserError

from ..conftest import perturb
from ..lm.models import TINY_LMS, batches, task_loss, tiny_llama

S = 0.5  # the parallel adapters' scale s


def bottleneck(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``U tanh(D x)`` by hand from the adapter's matrices (no biases: the LLM-Adapters form)."""
    return torch.tanh(x @ m.down.weight.T) @ m.up.weight.T


def block_io(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0's input, its attention's output and the block's output in one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    layer = model.model.layers[0]
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: seen.__setitem__("x", args[0])),
        layer.self_attn.register_forward_hook(lambda _, a, out: seen.__setitem__("attn", out[0])),
        layer.register_forward_hook(lambda _, a, out: seen.__setitem__("out", out)),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return seen


def adapters_of(model: nn.Module) -> dict[str, nn.Module]:
    """Block 0's adapter modules by the path of the module each adapts (relative to the block)."""
    return {
        a.path.removeprefix("model.layers.0."): a.parts["all"]
        for a in vpeft.core.adapted_modules(model, "default")
        if a.path.startswith("model.layers.0.") and "all" in a.parts
    }


def mlp(block: nn.Module, x: torch.Tensor, up_extra: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's MLP by hand, ``down(silu(gate(x)) * (up(x) + up_extra))``, and the input of its down projection."""
    inner = nn.functional.silu(block.mlp.gate_proj(x)) * (block.mlp.up_proj(x) + up_extra)
    return block.mlp.down_proj(inner), inner


# (method, targets) -> block 0's output from its input x, the base attention output a, the base block and the adapters
def series_after_mlp(x, a, block, ad):
    h = x + a
    m = mlp(block, block.post_attention_layernorm(h))[0]
    return h + m + bottleneck(ad.get("mlp.down_proj", ad.get("mlp")), m)


def series_after_attention(x, a, block, ad):
    a = a + bottleneck(ad.get("self_attn.o_proj", ad.get("self_attn")), a)
    h = x + a
    return h + mlp(block, block.post_attention_layernorm(h))[0]


def parallel_to_mlp(x, a, block, ad):
    h = x + a
    n = block.post_attention_layernorm(h)
    return h + mlp(block, n)[0] + S * bottleneck(ad["mlp"], n)


def parallel_to_attention(x, a, block, ad):
    h = x + a + S * bottleneck(ad["self_attn"], block.input_layernorm(x))
    return h + mlp(block, block.post_attention_layernorm(h))[0]


def parallel_to_each_linear(x, a, block, ad):
    h = x + a
    n = block.post_attention_layernorm(h)
    m, inner = mlp(block, n, S * bottleneck(ad["mlp.up_proj"], n))
    return h + m + S * bottleneck(ad["mlp.down_proj"], inner)


def parallel_on_the_residual_stream(x, a, block, ad):  # AdaptFormer's own placement, the default targets
    h = x + a
    return h + mlp(block, block.post_attention_layernorm(h))[0] + S * bottleneck(ad["mlp"], h)


PLACEMENTS = [
    ("adapter", ("mlp_out",), series_after_mlp),
    ("adapter", ("mlp",), series_after_mlp),
    ("adapter", ("attn_out",), series_after_attention),
    ("adapter", ("attn",), series_after_attention),  # Llama calls its attention with hidden_states=...
    ("adaptformer", ("mlp",), parallel_to_mlp),
    ("adaptformer", ("attn",), parallel_to_attention),
    ("adaptformer", ("mlp_in", "mlp_out"), parallel_to_each_linear),
    ("adaptformer", ("mlp", "mlp_norm"), parallel_on_the_residual_stream),
]


@pytest.mark.parametrize(("method", "targets", "by_hand"), PLACEMENTS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_the_adapter_sits_where_the_placement_says(method, targets, by_hand):
    base = tiny_llama()
    model = copy.deepcopy(base)
    options = dict(targets=targets, dim=4, act="tanh", dropout=0.0, bias=False)
    vpeft.apply_method(model, method, **options, **({"scale": S} if method == "adaptformer" else {}))
    perturb(model)  # the up projections away from zero
    ids = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    seen, reference = block_io(model, ids), block_io(base, ids)
    torch.testing.assert_close(seen["x"], reference["x"], rtol=0, atol=0)  # the embedding is untouched
    with torch.no_grad():
        expected = by_hand(reference["x"], reference["attn"], base.model.layers[0], adapters_of(model))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["out"], reference["out"])


def test_no_bias_option_counts_only_the_two_matrices():
    """LLM-Adapters' form on Llama's MLPs (32 wide, 2 blocks): 2 * (32 * 4 + 4 * 32) parameters, biases 2 * (4 + 32)
    more; the per-Linear parallel form reads 32 and writes 64 on up_proj, reads 64 and writes 32 on down_proj."""
    assert vpeft.apply_method(tiny_llama(), "adapter", dim=4, bias=False).trainable == 2 * (32 * 4 + 4 * 32)
    assert vpeft.apply_method(tiny_llama(), "adapter", dim=4).trainable == 2 * (32 * 4 + 4 * 32 + 4 + 32)
    per_linear = vpeft.apply_method(tiny_llama(), "adaptformer", targets=("mlp_in", "mlp_out"), dim=4, bias=False)
    assert per_linear.trainable == 2 * ((32 * 4 + 4 * 64) + (64 * 4 + 4 * 32))


# the paper's recommendations with its code's sizes: series after the MLP, parallel beside it (bottleneck 256, tanh)
RECIPES = {
    "series": ("adapter", dict(targets=("mlp_out",), dim=256, act="tanh", dropout=0.0, bias=False)),
    "series_after_attention": ("adapter", dict(targets=("attn_out",), dim=256, act="tanh", dropout=0.0, bias=False)),
    "parallel": ("adaptformer", dict(targets=("mlp",), dim=256, scale=1.0, act="tanh", dropout=0.0, bias=False)),
    "parallel_to_attention": ("adaptformer", dict(targets=("attn",), dim=256, scale=1.0, act="tanh", dropout=0.0)),
}
# BERT has no single module for its attention or its feed-forward (``attention.self`` + ``attention.output``;
# ``intermediate`` + ``output``): "attn" matches nothing there, and "mlp" is its output.dense, a Linear
REFUSED = {("parallel_to_attention", "bert"): "role 'attn' .* matches no module"}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lm", sorted(TINY_LMS))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_keep_the_contract_on_the_tiny_lms(recipe, lm, tmp_path):
    method, options = RECIPES[recipe]
    base = TINY_LMS[lm]()
    model = copy.deepcopy(base)
    if (recipe, lm) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[recipe, lm]):
            vpeft.apply_method(model, method, **options)
        return
    vpeft.apply_method(model, method, **options)
    batch = batches(1, seed=3)[0]

    def logits(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)  # the base model at initialisation
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for b in batches(2, seed=1):
        opt.zero_grad()
        task_loss(model, b)[0].backward()
        opt.step()
    model.eval()
    assert all(p.grad is not None and p.grad.any() for p in trainable)
    assert not torch.allclose(logits(model), logits(base))
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    with vpeft.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
