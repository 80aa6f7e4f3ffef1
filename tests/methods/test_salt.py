"""SALT: W' = U ReLU(S') V^T against an independent build, the cache (eval output equals a fresh rebuild, and is
invalidated by parameter changes and mode switches), SAM ViT's fused qkv, the regulariser and the ViT-B/16 count."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import layers_of
from vpeft.methods import _svd

from ..conftest import tiny_vit
from ._svd_fake import fake_svd


def randomise(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("head"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def expected_weight(layer, elementwise=True):
    """U ReLU(S') V^T with S' assembled as the full k x k block matrix."""
    r, S = layer.r, layer.S.double()
    k = S.numel()
    sigma = torch.zeros(k, k, dtype=torch.float64)
    sigma[:r, :r] = torch.diag(layer.trainable_scale.double() * S[:r] + layer.trainable_shift.double())
    sigma[r:, r:] = torch.diag(S[r:]) + layer.lora_X.double() @ layer.lora_Y.double()
    if elementwise:
        sigma = torch.relu(sigma)
    else:
        sigma = sigma - torch.diag(sigma.diagonal()) + torch.diag(torch.relu(sigma.diagonal()))
    return layer.U.double() @ sigma @ layer.V.double().T


@pytest.mark.parametrize("relu", ["elementwise", "diag"])
def test_forward_matches_formula(relu):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "salt", relu=relu, r_lora=8)
    layer = layers_of(model, "default")[0]  # blocks.0.attn.qkv, fused 192 x 64
    w, b = base.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.bias
    assert layer.r == 6 and layer.U.shape == (192, 64)
    torch.testing.assert_close(layer.S.double(), torch.linalg.svdvals(w.double()), rtol=0, atol=1e-6)
    torch.testing.assert_close(expected_weight(layer).float(), w, rtol=0, atol=1e-5)  # W' = W at init
    randomise(model)
    x = torch.randn(5, 64)
    expected = F.linear(x.double(), expected_weight(layer, relu == "elementwise"), b.double()).float()
    torch.testing.assert_close(model.blocks[0].attn.qkv(x), expected, rtol=1e-4, atol=1e-4)


def test_cache_equals_fresh_rebuild_and_invalidates(images):
    model = tiny_vit()
    vpeft.apply_method(model, "salt", r_lora=8)
    randomise(model)
    layer = layers_of(model, "default")[0]
    model.eval()
    with torch.no_grad():
        first = model(images)
        cached = layer._cache[1]
        assert model(images).equal(first) and layer._cache[1] is cached  # reused
        fresh = layer.build_delta()
    assert torch.equal(cached, fresh)
    with torch.enable_grad():  # a differentiable eval forward rebuilds, and gives the same output
        torch.testing.assert_close(model(images), first, rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_Y.add_(0.5)  # in-place change: the version counter moves
        changed = model(images)
        assert not torch.equal(changed, first)
        assert torch.equal(layer._cache[1], layer.build_delta())
    model.train()
    assert layer._cache is None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), changed, rtol=0, atol=0)


def test_sam_vit_fused_qkv():
    torch.manual_seed(0)
    sam = timm.create_model(
        "samvit_base_patch16", img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5, pretrained=False
    ).eval()
    base = copy.deepcopy(sam)
    report = vpeft.apply_method(sam, "salt", r_lora=16)
    targets = sam._vpeft.adapters["default"].targets
    assert "blocks.0.attn.qkv" in targets and len(targets) == 8  # qkv (whole), proj, fc1, fc2 x 2 blocks
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(sam(x), base(x), rtol=0, atol=1e-6)
    per_layer = lambda k, r: 2 * r + 2 * (k - r) * 16  # noqa: E731
    assert report.trainable == 8 * per_layer(64, 6)
    sam.train()
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        sam(x).logsumexp(-1).sum().backward()
        opt.step()
    sam.eval()
    with torch.no_grad():
        before = sam(x)
        vpeft.merge(sam)
        torch.testing.assert_close(sam(x), before, rtol=1e-5, atol=1e-5)


def test_regulariser():
    model = tiny_vit()
    assert vpeft.apply_method(model, "salt", r_lora=8) and vpeft.method_loss(model) is None  # off by default
    model = tiny_vit()
    vpeft.apply_method(model, "salt", r_lora=8, reg_weight=0.5)
    randomise(model)
    want = 0.0
    for layer in layers_of(model, "default"):
        s = layer.S[: layer.r]
        want += torch.linalg.vector_norm(layer.trainable_scale * s + layer.trainable_shift - s)
        want += torch.sqrt(((layer.lora_X @ layer.lora_Y) ** 2).sum())
    torch.testing.assert_close(vpeft.method_loss(model), 0.5 * want)


def test_sam1_init_is_not_identity(images):
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "salt", r_lora=8, init="sam1")
    assert not torch.allclose(model(images), base(images), atol=1e-6)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="salt option relu"):
        vpeft.apply_method(tiny_vit(), "salt", relu="gelu")
    with pytest.raises(ValueError, match="salt: r=64"):
        vpeft.apply_method(tiny_vit(), "salt", rank=64)


def test_vit_b16_count(vit_b16, monkeypatch):
    monkeypatch.setattr(_svd, "svd", fake_svd)
    r = 76  # floor(0.1 * 768); k = 768 for qkv (2304 x 768), proj, fc1 and fc2
    want = 48 * (2 * r + 2 * (768 - r) * 256)
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "salt").trainable == want == 17_013_888
