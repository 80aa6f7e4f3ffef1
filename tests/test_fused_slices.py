"""Adapted slices of one fused projection go to one ``adapt_slices`` call: the default runs ``adapt_output`` per slice
on its own columns, and LoRA computes all its slices at once (one dropout mask, one stacked A matmul)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import vpeft
from vpeft.core import AdapterModule, fused_parts
from vpeft.core.layers import Adapted, Switch  # the wrapper itself, a core internal, is what this file tests
from vpeft.methods._blocks import Dropout

from .conftest import tiny_vit


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def lora_qkv(dropout: float, r: int = 2, alpha: float = 6.0) -> tuple[nn.Linear, nn.Module]:
    """A fused Linear (8 -> 3 x 8) and a copy with LoRA on its q and v slices, trainable tensors randomised."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 24)
    model = nn.Sequential(copy.deepcopy(layer))
    vpeft.apply_method(model, "lora", targets=["0[q,v]"], r=r, alpha=alpha, dropout=dropout, head=[])
    return layer, randomised(model)


def updated_weight(layer: nn.Linear, parts: nn.ModuleDict) -> torch.Tensor:
    """The base weight with (alpha / r) B A added to the q rows (0:8) and v rows (16:24), by hand."""
    weight = layer.weight.detach().clone()
    for part, rows in (("q", slice(0, 8)), ("v", slice(16, 24))):
        weight[rows] += parts[part].scale * parts[part].lora_B.detach() @ parts[part].lora_A.detach()
    return weight


def test_lora_slices_equal_updated_weight_and_key_columns_stay_bit_identical():
    layer, model = lora_qkv(dropout=0.0)
    parts = model[0].adapters["default"]
    x = torch.randn(3, 5, 8)
    out = model(x)
    torch.testing.assert_close(out, F.linear(x, updated_weight(layer, parts), layer.bias), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[..., 8:16], layer(x)[..., 8:16])


def test_lora_slice_gradients_equal_per_slice_computation():
    layer, model = lora_qkv(dropout=0.0)
    parts = model[0].adapters["default"]
    x = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 24)
    ((model(x) - target) ** 2).sum().backward()
    fused = {n: p.grad.clone() for n, p in parts.named_parameters()} | {"x": x.grad.clone()}

    # reference: each slice on its own, as y_p + s B_p A_p x
    x_ref = x.detach().clone().requires_grad_(True)
    tensors = {n: p.detach().clone().requires_grad_(True) for n, p in parts.named_parameters()}
    y = F.linear(x_ref, layer.weight, layer.bias)
    q = y[:, :8] + parts["q"].scale * x_ref @ tensors["q.lora_A"].T @ tensors["q.lora_B"].T
    v = y[:, 16:] + parts["v"].scale * x_ref @ tensors["v.lora_A"].T @ tensors["v.lora_B"].T
    ((torch.cat([q, y[:, 8:16], v], dim=1) - target) ** 2).sum().backward()
    for name, tensor in tensors.items():
        torch.testing.assert_close(fused[name], tensor.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused["x"], x_ref.grad, rtol=1e-5, atol=1e-5)


def test_lora_slices_share_one_dropout_mask_on_the_input():
    layer, model = lora_qkv(dropout=0.5)
    parts = model[0].adapters["default"]
    model.train()
    x = torch.randn(6, 8)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    dropped = Dropout(0.5).train()(x)  # one draw of the methods' dropout, the same RNG stream
    expected = layer(x).detach().clone()
    for part, cols in (("q", slice(0, 8)), ("v", slice(16, 24))):
        expected[:, cols] += parts[part].scale * dropped @ parts[part].lora_A.T @ parts[part].lora_B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 8:16], layer(x)[:, 8:16])
    model.eval()  # no dropout at inference: the merged weight's output
    torch.testing.assert_close(model(x), F.linear(x, updated_weight(layer, parts), layer.bias), rtol=1e-5, atol=1e-6)


def test_saved_keys_and_merge_unchanged_on_a_vit(tmp_path):
    base, model = tiny_vit(), tiny_vit()
    vpeft.apply_method(model, "lora")
    randomised(model)
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    vpeft.save_adapter(model, tmp_path)
    keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if "qkv" in k}
    assert keys == {f"blocks.{i}.attn.qkv.{p}.lora_{m}" for i in range(2) for p in "qv" for m in "AB"}
    vpeft.merge(model)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)


class AddOne(AdapterModule):
    """A toy slice adapter without its own ``adapt_slices``: the default per-slice path."""

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + 1.0


class Recorded(AddOne):
    calls: list[tuple[list[str], list[str]]] = []

    @classmethod
    def adapt_slices(cls, x, y, parts, slices):
        cls.calls.append((list(parts), list(slices)))
        return super().adapt_slices(x, y, parts, slices)


def wrapped(method: type[AdapterModule], parts: tuple[str, ...]) -> tuple[nn.Linear, Adapted]:
    layer = nn.Linear(4, 12)
    wrapper = Adapted(layer, Switch(active="a"), fused_parts(layer))
    wrapper.adapters["a"] = nn.ModuleDict({p: method.__new__(method) for p in parts})
    for module in wrapper.adapters["a"].values():
        nn.Module.__init__(module)
    return layer, wrapper


def test_default_path_changes_only_the_adapted_slices_columns():
    layer, wrapper = wrapped(AddOne, ("q", "v"))
    x = torch.randn(3, 4)
    y, out = layer(x), wrapper(x)
    assert torch.equal(out[:, 4:8], y[:, 4:8])
    torch.testing.assert_close(out[:, :4], y[:, :4] + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 8:], y[:, 8:] + 1.0, rtol=0, atol=0)


def test_all_adapted_slices_of_a_projection_come_in_one_call_in_column_order():
    Recorded.calls.clear()
    _, wrapper = wrapped(Recorded, ("v", "q"))  # insertion order differs from column order
    wrapper(torch.randn(2, 4))
    assert Recorded.calls == [(["q", "v"], ["q", "k", "v"])]


def test_fact_slices_with_an_unadapted_key_slice():
    base, model = tiny_vit(), tiny_vit()
    vpeft.apply_method(model, "fact_tt", targets=["attn.qkv[q,v]"], dropout=0.0)
    randomised(model)
    parts = model.blocks[0].attn.qkv.adapters["default"]
    lin = base.blocks[0].attn.qkv
    weight = lin.weight.detach().clone()
    weight[:64] += parts["q"].delta_weight().detach()  # delta_weight: the method's own per-slice s V M U
    weight[128:] += parts["v"].delta_weight().detach()
    x = torch.randn(2, 5, 64)
    out = model.blocks[0].attn.qkv(x)
    torch.testing.assert_close(out, F.linear(x, weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., 64:128], lin(x)[..., 64:128])
