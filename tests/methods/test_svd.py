"""The shared SVD helper of soma, salt and comp_lora against float64 torch.linalg.svd, rank-deficient input included."""

from __future__ import annotations

import pytest
import torch

from vpeft.methods._svd import svd


@pytest.mark.parametrize("shape", [(48, 48), (96, 24), (24, 96)])
@pytest.mark.parametrize("rank", [None, 5])
def test_svd_is_exact(shape, rank):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    if rank is not None:  # rank-deficient: the helper must fall back, not divide by ~0
        w = (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)) * 0.02
    threads = torch.get_num_threads()
    U, S, V = svd(w)
    assert torch.get_num_threads() == threads  # the helper restores the thread count
    k = min(shape)
    assert U.shape == (shape[0], k) and S.shape == (k,) and V.shape == (shape[1], k) and U.dtype == torch.float32
    ref = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(S.double(), ref, rtol=0, atol=1e-6 * float(ref[0]))
    assert torch.all(S[:-1] >= S[1:])
    torch.testing.assert_close(U * S @ V.T, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(V.T @ V, torch.eye(k), rtol=0, atol=1e-5)
    if rank is None:
        torch.testing.assert_close(U.T @ U, torch.eye(k), rtol=0, atol=1e-5)
