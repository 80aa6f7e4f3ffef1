"""Quantised bases (PEQA, L4Q, SketchTune, HALO) and the replaced base of the core, against independent computations:
packed bytes, round-to-nearest grids, LSQ's step-size gradient, the scatter-add of a sketch's gradient, Hadamard
rotations and their quantisation error bound, and what disabled/merge/unmerge/delete mean for a released base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import adapter_tensors, layers_of
from vpeft.errors import ConfigError
from vpeft.methods import _quant
from vpeft.methods.halo import halo_matmul
from vpeft.methods.sketchtune import sketch

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Two "blocks" of two Linears each (the quantised-base methods target every Linear inside a block)."""

    def __init__(self, width: int = 16, hidden: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def applied(method: str, **options) -> tuple[nn.Module, nn.Module]:
    base = Net()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, head=(), **options)
    return base, model


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


# ---- packing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_round_trips_in_bits_over_8_bytes_a_code(bits):
    codes = torch.randint(0, 1 << bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = _quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(_quant.unpack(packed, bits, codes.numel()).view(7, 13), codes.to(torch.uint8))


def test_four_bit_codes_are_two_a_byte_low_nibble_first():
    packed = _quant.pack(torch.tensor([3, 12, 15, 0, 9]), 4)
    assert packed.tolist() == [3 | 12 << 4, 15 | 0 << 4, 9]


def test_a_peqa_layer_holds_its_weight_in_half_a_byte_a_weight_and_frees_the_float_one():
    base, model = applied("peqa")
    layers = layers_of(model, "default")
    assert [m.packed_bytes() for m in layers] == [16 * 32 // 2, 32 * 16 // 2] * 2  # uint8, two codes a byte
    assert all(m.codes.dtype == torch.uint8 for m in layers)
    released = [n for n, p in model.named_parameters() if n.endswith("base_layer.weight")]
    assert len(released) == 4 and all(dict(model.named_parameters())[n].numel() == 0 for n in released)
    assert vpeft.report(model).base_total == sum(p.numel() for p in base.parameters())  # counted as held packed


# ---- PEQA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("group_size", "groups"), [(None, 1), (8, 2)])
def test_peqa_trains_one_scale_per_group_and_starts_at_the_rtn_grid(group_size, groups):
    base, model = applied("peqa", group_size=group_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_row = (lambda m: 1) if group_size is None else (lambda m: m.in_features // group_size)  # noqa: E731
    assert trainable == sum(m.out_features * per_row(m) for m in base.modules() if isinstance(m, nn.Linear))
    layer = layers_of(model, "default")[0]
    w = base.blocks[0][0].weight.detach()
    g = w.view(32, groups, -1)
    low, high = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    step = (high - low) / 15
    zero = torch.round(-low / step)
    expected = step[..., None] * (
        torch.clamp(torch.round(g / step[..., None]) + zero[..., None], 0, 15) - zero[..., None]
    )
    torch.testing.assert_close(layer.effective_weight(), expected.view(32, 16), rtol=0, atol=1e-7)
    assert ((layer.effective_weight() - w).abs().view(32, groups, -1) <= step[..., None] / 2 + 1e-7).all()


def test_peqa_group_size_must_divide_the_width():
    model = Net()
    with pytest.raises(ConfigError, match="group_size=5 does not divide the input width 16"):
        vpeft.apply_method(model, "peqa", head=(), group_size=5)
    assert all(p.numel() > 0 for p in model.parameters())  # nothing freed


def test_peqa_saves_the_scales_only():
    _, model = applied("peqa")
    assert {k.rsplit(".", 1)[-1] for k in adapter_tensors(model, "default")} == {"scales"}


def test_frozen_scales_train_nothing_and_compute_the_rtn_model():
    _, peqa = applied("peqa")
    _, frozen = applied("peqa", train_scales=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(frozen(inputs()), peqa(inputs()), rtol=0, atol=0)


# ---- the released base: disabled, merge, unmerge, delete ---------------------------------------------------------
@pytest.mark.parametrize("method", ["peqa", "sketchtune"])
def test_a_released_base_disables_to_the_quantised_model_merges_unmerges_and_deletes_to_it(method):
    base, model = applied(method)
    x = inputs()
    quantised = model(x)
    assert not torch.allclose(quantised, base(x))  # really quantised
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    tuned = model(x)
    with vpeft.disabled(model):
        torch.testing.assert_close(model(x), quantised, rtol=0, atol=0)
    vpeft.merge(model)  # a plain model again: the dequantised trained weight written into each Linear
    assert all(type(m) is nn.Linear for m in model.blocks[0] if not isinstance(m, nn.GELU))
    assert model.blocks[0][0].weight.shape == (32, 16)
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)
    vpeft.unmerge(model)
    assert model.blocks[0][0].base_layer.weight.numel() == 0  # freed again
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)
    vpeft.delete_adapter(model, "default")  # the quantised base stays, as plain weights
    torch.testing.assert_close(model(x), quantised, rtol=0, atol=0)
    assert model.blocks[0][0].weight.shape == (32, 16)


def test_a_released_base_is_the_only_adapter_on_its_model():
    _, model = applied("peqa")
    with pytest.raises(ValueError, match="replaces the base weights"):
        vpeft.apply_method(model, "lora", targets=["blocks.0.0"], head=(), adapter_name="other")
    lora = Net()
    vpeft.apply_method(lora, "lora", targets=["blocks.0.0"], head=())
    with pytest.raises(ValueError, match="replaces the base weights"):
        vpeft.apply_method(lora, "peqa", head=(), adapter_name="other")


# ---- the rebuilt-weight backward ---------------------------------------------------------------------------------
def test_the_recomputed_backward_gives_autograds_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.rand(5, 1, dtype=torch.float64, generator=g).requires_grad_()
    codes = torch.randint(0, 16, (5, 8), generator=g).double()
    bias = torch.randn(5, dtype=torch.float64, generator=g)
    out = torch.randn(4, 6, 5, dtype=torch.float64, generator=g)
    fn = lambda scales: scales * (codes - 7)  # noqa: E731
    (_quant.recomputed_linear(x, bias, fn, s) * out).sum().backward()
    got = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    (torch.nn.functional.linear(x, fn(s), bias) * out).sum().backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], s.grad, rtol=1e-12, atol=1e-12)


# ---- L4Q ---------------------------------------------------------------------------------------------------------
def test_l4q_step_and_offset_gradients_are_lsqs_formula():
    base, model = applied("l4q", group_size=8, r=2)
    layer = layers_of(model, "default")[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)  # a merge that differs from W0, so no weight sits on a grid edge by design
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(7, 32, generator=torch.Generator().manual_seed(6))
    (model.blocks[0][0](x) * upstream).sum().backward()
    # by hand: W = W0 + (alpha / r) B A; v = (W - beta) / s; dWq/ds = round(v) - v inside, 0 below, Q above; dWq/dbeta
    # = 0 inside, 1 outside; both times g = 1 / sqrt(N Q); dL/dWq = upstream^T x
    with torch.no_grad():
        w = base.blocks[0][0].weight + (16.0 / 2) * layer.lora_B @ layer.lora_A
        v = (w.view(32, 2, 8) - layer.offset[..., None]) / layer.step[..., None]
        below, above = v <= 0, v >= 15
        d_step = torch.where(below, 0.0, torch.where(above, 15.0, torch.round(v) - v))
        d_offset = (below | above).float()
        grad_w = (upstream.T @ x).view(32, 2, 8)
        g = 1 / (8 * 15) ** 0.5
    torch.testing.assert_close(layer.step.grad, g * (grad_w * d_step).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.offset.grad, g * (grad_w * d_offset).sum(-1), rtol=1e-5, atol=1e-6)
    assert layer.step.grad.abs().sum() > 0


def test_l4q_ends_fully_quantised_and_disables_to_the_float_model():
    base, model = applied("l4q", group_size=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = inputs()
    with vpeft.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    tuned = model(x)
    vpeft.merge(model)
    weight = model.blocks[0][0].weight.view(32, 2, 8)
    assert max(len(torch.unique(weight[i, j])) for i in range(32) for j in range(2)) <= 16  # a 4-bit grid per group
    torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)
    vpeft.unmerge(model)
    assert torch.equal(model.blocks[0][0].base_layer.weight, base.blocks[0][0].weight)  # W0 back, bit for bit


# ---- SketchTune --------------------------------------------------------------------------------------------------
def test_sketchtune_codebook_gradient_is_the_scatter_add_of_the_weight_gradient_exactly():
    _, model = applied("sketchtune", bits=3)
    layer = layers_of(model, "default")[0]
    assert layer.codebook.shape == (32, 1, 8)
    # integers throughout, so every product and sum is exact in float32 and the order of summation cannot matter
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.codebook.copy_(torch.randint(-3, 4, layer.codebook.shape, generator=g).float())
    x = torch.randint(-2, 3, (6, 16), generator=g).float()
    upstream = torch.randint(-2, 3, (6, 32), generator=g).float()
    (model.blocks[0][0](x) * upstream).sum().backward()
    grad_w = upstream.T @ x  # dL/dW, (out, in)
    codes = layer.unpacked().long()
    expected = torch.zeros(32, 8).scatter_add_(1, codes, grad_w)
    assert torch.equal(layer.codebook.grad.view(32, 8), expected) and expected.abs().sum() > 0


def test_sketch_weights_are_codebook_entries_and_lloyd_rounds_never_raise_the_error():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    errors = []
    for rounds in (0, 1, 3, 10):
        codebook, codes = sketch(w, 2, 2, rounds)
        rebuilt = torch.gather(codebook, -1, codes.view(24, 2, 8)).view(24, 16)
        errors.append(((rebuilt - w) ** 2).sum().item())
        assert codes.max() < 4
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:], strict=False)) and errors[-1] < errors[0]


# ---- HALO --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_is_exact(n):
    h = _quant.hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n))  # integer entries: exactly n I
    x = torch.randn(3, 5 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    hn = _quant.hadamard(n, torch.float64) / n**0.5
    torch.testing.assert_close(_quant.rotate(_quant.rotate(x, hn), hn.T), x, rtol=0, atol=1e-12)


def test_block_sizes_are_powers_of_two_that_divide_the_width():
    assert [_quant.block_size(w, 256) for w in (576, 1536, 192, 4096, 96)] == [64, 256, 64, 256, 32]


def _bound(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """|Q(a) Q(b)^T - a b^T| <= (sa/2) sum|b| + (sb/2) sum|a| + k (sa/2)(sb/2), per-row symmetric RTN steps sa, sb."""
    top = (1 << (bits - 1)) - 1
    sa, sb = a.abs().amax(-1, keepdim=True) / top, b.abs().amax(-1, keepdim=True) / top
    return sa / 2 * b.abs().sum(-1) + a.abs().sum(-1, keepdim=True) * sb.T / 2 + a.shape[-1] * sa / 2 * sb.T / 2


def test_halo_matmul_error_stays_within_the_quantisers_bound_and_rotation_tames_an_outlier():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 128, dtype=torch.float64, generator=g)
    x[:, 5] *= 50  # an outlier channel
    w = torch.randn(10, 128, dtype=torch.float64, generator=g)
    h = _quant.hadamard(128, torch.float64) / 128**0.5
    exact = x @ w.T
    for bits in (4, 8):
        got = halo_matmul(x, w, h, bits)
        bound = _bound(_quant.rotate(x, h), _quant.rotate(w, h), bits)
        error = (got - exact).abs()
        assert (error <= bound * (1 + 1e-9)).all() and error.max() > 0
    plain = halo_matmul(x, w, torch.eye(128, dtype=torch.float64), 8)  # no rotation
    assert (halo_matmul(x, w, h, 8) - exact).abs().mean() < (plain - exact).abs().mean()


def test_halo_trains_through_the_low_precision_base_and_infers_in_full_precision():
    base, model = applied("halo")
    base.eval(), model.eval()
    x = inputs().requires_grad_()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # eval: the base as it is (B = 0)
    model.train()
    layer = model.blocks[0][0]
    y = layer(x)
    assert not torch.allclose(y, base.blocks[0][0](x)) and (y - base.blocks[0][0](x)).abs().max() < 0.05
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (grad_x,) = torch.autograd.grad((y * upstream).sum(), x)
    exact = upstream @ base.blocks[0][0].weight  # dY W; HALO's is Q(dY H') Q(W^T H')^T
    h_out = layers_of(model, "default")[0].h_out
    bound = _bound(_quant.rotate(upstream, h_out).reshape(-1, 32), _quant.rotate(base.blocks[0][0].weight.T, h_out), 8)
    assert ((grad_x - exact).abs().reshape(-1, 16) <= bound * (1 + 1e-4) + 1e-6).all()
    assert not torch.equal(grad_x, exact)


def test_a_halo_trained_lora_exports_as_a_lora_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    from ..conftest import perturb
    from ..lm.models import batches, task_loss, tiny_llama

    base = tiny_llama().eval()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "halo", head=())
    perturb(model)
    vpeft.export_hf_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    batch = batches(1, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(task_loss(loaded, batch)[1], task_loss(model, batch)[1], rtol=0, atol=1e-5)
        assert not torch.allclose(task_loss(base, batch)[1], task_loss(model, batch)[1])
