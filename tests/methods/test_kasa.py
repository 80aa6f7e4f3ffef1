"""KaSA: the truncation of the base on purpose (measured), the update and regulariser by hand, the base untouched.
Equality with HF PEFT's KaSA: tests/lm/test_kasa_peft.py."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import layers_of

from ..conftest import perturb, tiny_vit
from ..lm.models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_truncation_drops_the_smallest_components_and_the_base_stays(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "kasa", r=4)
    q = layers_of(model, "default")[0]  # blocks.0.attn.qkv[q]: 64 x 64
    w = base.blocks[0].attn.qkv.weight[:64].double()
    U, S, Vh = torch.linalg.svd(w)
    truncated = U[:, :-4] @ torch.diag(S[:-4]) @ Vh[:-4]  # the best rank-60 approximation, float64
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        out = model.blocks[0].attn.qkv(x.float())[:, :64].double()
    torch.testing.assert_close(out, x @ truncated.T + base.blocks[0].attn.qkv.bias[:64].double(), rtol=0, atol=1e-5)
    # the truncation is part of the method: measured, the output at init moves, by about the dropped energy
    with torch.no_grad():
        change = (model(images) - base(images)).abs().max().item()
    assert change > 1e-3, change
    assert torch.equal(model.blocks[0].attn.qkv.base_layer.weight, base.blocks[0].attn.qkv.weight)  # W0 untouched
    with vpeft.disabled(model), torch.no_grad():
        assert torch.equal(model(images), base(images))
    assert q.lora_diag.shape == (4,) and q.lora_diag.requires_grad
    assert torch.equal(q.lora_B, torch.zeros(64, 4))


def test_update_and_merge_by_hand():
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "kasa", r=4, alpha=6.0)
    perturb(model)
    v = layers_of(model, "default")[1]  # blocks.0.attn.qkv[v]
    w = base.blocks[0].attn.qkv.weight[128:].double()
    U, S, Vh = torch.linalg.svd(w)
    expected = U[:, :-4] @ torch.diag(S[:-4]) @ Vh[:-4]
    expected = expected + 1.5 * v.lora_B.double() @ torch.diag(v.lora_diag.double()) @ v.lora_A.double()
    merged = copy.deepcopy(model)
    vpeft.merge(merged)
    torch.testing.assert_close(merged.blocks[0].attn.qkv.weight[128:].double(), expected, rtol=0, atol=1e-5)
    vpeft.unmerge(merged)
    torch.testing.assert_close(merged.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight, rtol=0, atol=1e-6)


def test_regulariser_by_hand():
    model = tiny_vit()
    vpeft.apply_method(model, "kasa", r=4, beta=0.3, gamma=0.7)
    perturb(model)
    expected = 0.0
    for layer in layers_of(model, "default"):
        a, b, d = layer.lora_A.double(), layer.lora_B.double(), layer.lora_diag.double()
        gram_b, gram_a = b.T @ b - torch.eye(4, dtype=torch.float64), a @ a.T - torch.eye(4, dtype=torch.float64)
        expected += 0.3 * (d**2).sum() + 0.7 * ((gram_b**2).sum().sqrt() + (gram_a**2).sum().sqrt())
    assert vpeft.method_loss(model).item() == pytest.approx(expected.item(), rel=1e-6)
    off = tiny_vit()
    vpeft.apply_method(off, "kasa", r=4, beta=0.0, gamma=0.0)
    assert vpeft.method_loss(off) is None


def test_rank_must_leave_one_component():
    with pytest.raises(ValueError, match="kasa option r=16 must be below min"):
        vpeft.apply_method(tiny_llama(), "kasa", r=16)  # Llama's v_proj is 16 x 32
