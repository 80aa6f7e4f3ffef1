"""FacT-TT / FacT-TK: weight deltas against a Kronecker-product computation, TK's slice columns, forward = merged
Linear, shared factors saved once, ViT-B/16 counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import shared_of

from ..conftest import tiny_vit


def adapted(method: str, **options):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, **options)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return base, model.eval()


def layer(model, path: str, part: str = "all"):
    return dict(model.named_modules())[path].adapters["default"][part]


def kron_delta(U, V, M, a, b, s):
    """s (I_a kron V) M (I_b kron U), written with torch.kron."""
    return s * torch.kron(torch.eye(a), V) @ M @ torch.kron(torch.eye(b), U)


def tk_core(shared, col):
    """K_c[u, v] = sum_l C[u, v, l] P[l, c]."""
    return torch.einsum("uvl,l->uv", shared.C, shared.P[:, col])


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_delta_weight_by_hand(method):
    _, model = adapted(method, r=4, scale=3.0)
    sh = shared_of(model, "default")
    U, V, r = sh.U.detach(), sh.V.detach(), 4
    for path, part, a, b, slot in [
        ("blocks.1.attn.qkv", "k", 1, 1, 1),
        ("blocks.1.attn.proj", "all", 1, 1, 3),
        ("blocks.1.mlp.fc1", "all", 4, 1, 4),
        ("blocks.1.mlp.fc2", "all", 1, 4, 8),
    ]:
        mod = layer(model, path, part)
        if method == "fact_tt":
            M = mod.core.detach()
        else:  # official column layout: 12 slices per block, q k v proj fc1(4) fc2(4)
            col = 12 * 1 + slot
            blocks = [[tk_core(sh, col + i * b + j).T for j in range(b)] for i in range(a)]
            M = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0).detach()
        assert M.shape == (a * r, b * r)
        torch.testing.assert_close(mod.delta_weight(), kron_delta(U, V, M, a, b, 3.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_forward_equals_linear_with_merged_weight(method):
    base, model = adapted(method)
    for path in ("mlp.fc1", "mlp.fc2", "attn.qkv"):
        lin = base.blocks[0].get_submodule(path)
        wrapped = model.blocks[0].get_submodule(path)
        delta = (
            torch.cat([layer(model, f"blocks.0.{path}", p).delta_weight() for p in "qkv"])
            if path == "attn.qkv"
            else layer(model, f"blocks.0.{path}").delta_weight()
        )
        xin = torch.randn(2, 5, lin.in_features)
        torch.testing.assert_close(wrapped(xin), F.linear(xin, lin.weight + delta, lin.bias), rtol=1e-5, atol=1e-5)


def test_shared_factors_are_saved_once(tmp_path):
    _, model = adapted("fact_tk", r=4)
    vpeft.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {k for k in keys if k.startswith("vpeft_shared.")} == {f"vpeft_shared.{n}" for n in "UVCP"}
    assert not [k for k in keys if not k.startswith(("vpeft_shared.", "head."))]  # TK has no per-target tensor
    assert shared_of(model, "default").P.shape == (4, 2 * 12)


def test_dropout_acts_on_the_code_in_training():
    _, model = adapted("fact_tt", dropout=0.5)
    model.train()
    x = torch.randn(2, 5, 64)
    outs = [model.blocks[0].attn.proj(x) for _ in range(2)]
    assert not torch.allclose(*outs)
    model.eval()
    torch.testing.assert_close(model.blocks[0].attn.proj(x), model.blocks[0].attn.proj(x))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="fact_tk option r"):
        vpeft.apply_method(tiny_vit(), "fact_tk", r=0)
    with pytest.raises(ValueError, match="fact_tt option dropout"):
        vpeft.apply_method(tiny_vit(), "fact_tt", dropout=-0.1)


@pytest.mark.parametrize(
    "method,r,count",
    [
        ("fact_tt", 8, 1536 * 8 + 144 * 64),
        ("fact_tt", 16, 61_440),
        ("fact_tk", 32, 1680 * 32 + 32**3),
        ("fact_tk", 16, 30_976),
    ],
)
def test_vit_b16_count(vit_b16, method, r, count):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), method, r=r)
    assert report.trainable == count
    assert len(report.rows) == 12 * 6 + 1  # q, k, v, proj, fc1, fc2 per block, plus the shared factors


def test_defaults():
    assert vpeft.apply_method(tiny_vit(), "fact_tt").trainable == 2 * 64 * 8 + 2 * 12 * 8 * 8
    tk = vpeft.methods.METHODS["fact_tk"].Config()
    assert (tk.r, tk.scale, tk.dropout) == (32, 10.0, 0.1)
