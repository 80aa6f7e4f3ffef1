"""VeRA against direct computations: ``h = W0 x + diag(b) B diag(d) A x`` with one frozen random pair shared by all
targets, each reading its leading block; the projections as buffers, saved or rebuilt from the key; the count."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import vpeft
from vpeft.core import shared_of

from ._two_layers import TwoLayers


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayers(hidden=4, d_out=5)


def randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_vit_b16_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "vera")  # r = 256 on the q and v slices of qkv
    assert report.trainable == 12 * 2 * (256 + 768) == 24_576


def test_forward_is_the_paper_s_equation_with_shared_sliced_projections():
    base = two_layers()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "vera", targets=["fc1", "fc2"], r=3, head=[])
    randomised(model)
    shared = shared_of(model, "default")
    a, b = shared.vera_A, shared.vera_B
    assert a.shape == (3, 6) and b.shape == (5, 3)  # (r, max in), (max out, r)
    x = torch.randn(7, 6)
    h = x
    for name in ("fc1", "fc2"):
        layer, vera = getattr(base, name), getattr(model, name).adapters["default"]["all"]
        n_out, n_in = layer.weight.shape
        delta = torch.diag(vera.vera_lambda_b) @ b[:n_out] @ torch.diag(vera.vera_lambda_d) @ a[:, :n_in]
        h = F.linear(h, layer.weight + delta, layer.bias)
        h = torch.tanh(h) if name == "fc1" else h
    torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-5)


def test_projections_are_frozen_kaiming_uniform_buffers_and_vectors_start_at_b_0_d_initial():
    model = two_layers()
    vpeft.apply_method(model, "vera", targets=["fc1", "fc2"], r=64, d_initial=0.25, head=[])
    shared = shared_of(model, "default")
    assert not list(shared.parameters())
    assert shared.vera_A.abs().max() <= math.sqrt(6 / 6) and shared.vera_B.abs().max() <= math.sqrt(6 / 64)
    assert shared.vera_A.abs().max() > 0.9 * math.sqrt(6 / 6)  # spread over the whole bound
    vera = model.fc1.adapters["default"]["all"]
    assert torch.equal(vera.vera_lambda_b, torch.zeros(4)) and torch.equal(vera.vera_lambda_d, torch.full((64,), 0.25))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "fc1.adapters.default.all.vera_lambda_b", "fc1.adapters.default.all.vera_lambda_d",
        "fc2.adapters.default.all.vera_lambda_b", "fc2.adapters.default.all.vera_lambda_d",
    ]  # fmt: skip


def test_projections_saved_or_rebuilt_from_the_key(tmp_path):
    for save in (True, False):
        model = two_layers()
        vpeft.apply_method(model, "vera", targets=["fc1", "fc2"], r=3, save_projection=save, projection_prng_key=11)
        randomised(model)
        vpeft.save_adapter(model, tmp_path / str(save))
        keys = set(load_file(tmp_path / str(save) / "adapter_model.safetensors"))
        assert ({"vpeft_shared.vera_A", "vpeft_shared.vera_B"} <= keys) == save
        fresh = two_layers()
        vpeft.load_adapter(fresh, tmp_path / str(save))
        x = torch.randn(2, 6)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
