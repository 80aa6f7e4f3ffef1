"""SVFit: exactly r trainable singular values per matrix (fixed r, and r from the 99% energy rule by hand), the update
``U_r diag(sigma - S_r) V_r^T`` against a float64 SVD, U and V frozen, and the per-target ranks kept in the config."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import adapter_record, layers_of
from vpeft.methods.svfit import energy_rank

from ..conftest import perturb, tiny_vit


def test_fixed_r_trains_exactly_r_values_per_matrix():
    model = tiny_vit()
    report = vpeft.apply_method(model, "svfit", r=5, head=())
    layers = layers_of(model, "default")
    assert len(layers) == 4  # q and v of two blocks
    assert report.trainable == 4 * 5
    for layer in layers:
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sigma"]
        assert layer.sigma.shape == (5,)


def test_energy_rule_by_hand():
    base = tiny_vit()
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "svfit", energy=0.9, head=())
    expected = []
    for block in base.blocks:
        for rows in (slice(0, 64), slice(128, 192)):  # q, v
            S = torch.linalg.svdvals(block.attn.qkv.weight[rows].double())
            share = (S**2).cumsum(0) / (S**2).sum()
            expected.append(next(i + 1 for i, c in enumerate(share.tolist()) if c >= 0.9))
    ranks = dict(adapter_record(model, "default").config.ranks)
    assert list(ranks.values()) == expected and 1 < min(expected) and max(expected) < 64
    assert report.trainable == sum(expected)


def test_energy_rank_counts():
    S = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert energy_rank(S, 0.6) == 1  # 9 / 14.25 = 0.63
    assert energy_rank(S, 0.9) == 2  # 13 / 14.25 = 0.91
    assert energy_rank(S, 0.95) == 3  # 14 / 14.25 = 0.98
    assert energy_rank(S, 0.99) == 4


def test_update_against_a_float64_svd(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "svfit", r=6)
    assert torch.equal(model(images), base(images))  # sigma - S_r is exactly zero at init
    perturb(model)
    v = layers_of(model, "default")[1]  # blocks.0.attn.qkv[v]
    w = base.blocks[0].attn.qkv.weight[128:].double()
    U, S, Vh = torch.linalg.svd(w)
    torch.testing.assert_close(v.S0.double(), S[:6], rtol=1e-6, atol=0)
    # W = U_r diag(sigma) V_r^T + W_e with W_e = W - U_r diag(S_r) V_r^T
    expected = w + U[:, :6] @ torch.diag(v.sigma.double() - S[:6]) @ Vh[:6]
    merged = copy.deepcopy(model)
    vpeft.merge(merged)
    torch.testing.assert_close(merged.blocks[0].attn.qkv.weight[128:].double(), expected, rtol=0, atol=1e-5)
    assert not v.U.requires_grad and not v.Vh.requires_grad


def test_ranks_are_kept_for_a_reload_and_a_wrong_table_is_refused(tmp_path):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "svfit", energy=0.8)
    vpeft.save_adapter(model, tmp_path / "a")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "a")
    assert adapter_record(fresh, "default").config.ranks == adapter_record(model, "default").config.ranks
    with pytest.raises(ValueError, match="svfit option ranks has no entry for target 'blocks.0.attn.qkv\\[q\\]'"):
        vpeft.apply_method(tiny_vit(), "svfit", ranks=[["blocks.9.attn.qkv[q]", 3]])
