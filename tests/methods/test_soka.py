"""SoKA: Van Loan's rearrangement entry by entry, the KPSVD recovering a constructed sum of Kronecker products, the
rank rule (energy, elbow, cap) on spectra worked by hand, the Kronecker product applied without forming it, and the
adapter's start: the best Kronecker-rank-r part of W, exact identity, the parameter count."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import adapter_record, layers_of
from vpeft.methods.soka import kpsvd, kron_apply, rearrange, select_rank, split

from ..conftest import perturb, tiny_vit


def test_split_is_the_most_balanced_divisor_pair():
    assert split(64) == (8, 8) and split(32) == (4, 8) and split(768) == (24, 32) and split(4096) == (64, 64)
    assert split(3072) == (48, 64) and split(7) == (1, 7)


def test_rearrangement_entry_by_entry():
    W = torch.arange(6 * 4, dtype=torch.float64).reshape(6, 4)  # m = 2 * 3, n = 2 * 2
    R = rearrange(W, 2, 2)
    assert R.shape == (4, 6)
    for i1 in range(2):
        for j1 in range(2):
            block = W[i1 * 3 : (i1 + 1) * 3, j1 * 2 : (j1 + 1) * 2]  # the (i1, j1) block, 3 x 2
            assert torch.equal(R[i1 * 2 + j1], block.flatten())
    A, B = torch.randn(2, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(rearrange(torch.kron(A, B), 2, 2), torch.outer(A.flatten(), B.flatten()))


def test_kpsvd_recovers_a_constructed_sum_of_kronecker_products():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 6, generator=g)  # three terms, U_k (4 x 6), V_k (8 x 5): W is 32 x 30
    B = torch.randn(3, 8, 5, generator=g)
    W = sum(torch.kron(a, b) for a, b in zip(A, B, strict=True))
    sigma, U, V = kpsvd(W, 4, 6)
    assert sigma.shape == (24,) and U.shape == (24, 4, 6) and V.shape == (24, 8, 5)
    assert sigma[3:].max() <= 1e-5 * sigma[0]  # Kronecker rank 3
    rebuilt = sum(s * torch.kron(u, v) for s, u, v in zip(sigma[:3], U[:3], V[:3], strict=True))
    torch.testing.assert_close(rebuilt, W, rtol=0, atol=1e-5 * W.abs().max().item())
    # the factors are orthonormal in the Frobenius inner product, as an SVD's vectors
    gram = torch.einsum("kab,lab->kl", U[:3], U[:3])
    torch.testing.assert_close(gram, torch.eye(3), rtol=0, atol=1e-5)


def test_rank_rule_on_spectra_worked_by_hand():
    s = torch.tensor([10.0, 9.0, 1.0, 0.5, 0.4, 0.3])  # energies 100, 81, 1, .25, .16, .09: total 182.5
    # energy 0.9: 100 < 164.25 <= 181 -> 2. Elbow: the chord from (1, 10) to (6, 0.3) has slope -1.94; distances
    # |s_k - line_k|: k=2 |9 - 8.06| = 0.94, k=3 |1 - 6.12| = 5.12, k=4 |0.5 - 4.18| = 3.68 -> 3
    assert select_rank(s, 0.9, 8) == 2
    assert select_rank(s, 0.995, 8) == 3  # energy: 182 >= 181.59 at k=3; elbow 3
    assert select_rank(s, 0.999, 8) == 3  # energy 5 (182.41 >= 182.32), the elbow caps it
    assert select_rank(s, 0.999, 8, elbow=False) == 5
    assert select_rank(s, 0.999, 2) == 2  # max_rank caps
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert select_rank(flat, 0.5, 8) == 1  # a flat spectrum has no knee: the first point, and energy 2 -> 1


def test_kron_apply_equals_the_dense_product():
    g = torch.Generator().manual_seed(1)
    sigma, U, V = torch.randn(3, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(3, 8, 5, generator=g)
    x = torch.randn(2, 7, 30, generator=g)
    dense = sum(s * torch.kron(u, v) for s, u, v in zip(sigma, U, V, strict=True))
    torch.testing.assert_close(kron_apply(x, sigma, U, V), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_adapter_starts_from_the_best_kronecker_rank_r_part(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "soka", max_rank=3, energy=0.99, elbow=False, head=())
    assert torch.equal(model(images), base(images))  # K - K0 cancels exactly at init
    ranks = dict(adapter_record(model, "default").config.ranks)
    assert set(ranks.values()) == {3}
    assert report.trainable == 4 * 3 * (8 * 8 + 8 * 8 + 1)  # q and v (64 x 64: 8 x 8 factors) of two blocks
    q = layers_of(model, "default")[0]
    w = base.blocks[0].attn.qkv.weight[:64].double()
    R = w.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)  # independent rearrangement, float64
    u, s, vh = torch.linalg.svd(R)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # the best rank-3 R, i.e. the best Kronecker-rank-3 W, rearranged
    start = sum(a * torch.kron(b, c) for a, b, c in zip(q.sigma0, q.U0, q.V0, strict=True)).double()
    torch.testing.assert_close(rearrange(start, 8, 8), best, rtol=0, atol=1e-5)
    perturb(model)
    now = sum(a * torch.kron(b, c) for a, b, c in zip(q.soka_sigma, q.soka_U, q.soka_V, strict=True))
    merged = copy.deepcopy(model)
    vpeft.merge(merged)
    expected = base.blocks[0].attn.qkv.weight[:64] + now - start.float()
    torch.testing.assert_close(merged.blocks[0].attn.qkv.weight[:64], expected, rtol=0, atol=1e-5)


def test_default_rank_rule_keeps_few_terms_on_the_tiny_vit():
    model = tiny_vit()
    vpeft.apply_method(model, "soka")
    ranks = dict(adapter_record(model, "default").config.ranks)
    assert len(ranks) == 4 and all(1 <= r <= 8 for r in ranks.values())
    with pytest.raises(ValueError, match="soka option ranks has no entry"):
        vpeft.apply_method(tiny_vit(), "soka", ranks=[["nowhere", 2]])
