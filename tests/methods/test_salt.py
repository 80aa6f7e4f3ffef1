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
    vpeft.apply_method(model, "salt", relu=relu, r_lora=8, ratio=0.1)
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
    report = vpeft.apply_method(sam, "salt", r_lora=16, ratio=0.1)
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


def test_vit_b16_count_of_the_released_configuration(vit_b16, monkeypatch):
    monkeypatch.setattr(_svd, "svd", fake_svd)
    r = 76  # floor(0.1 * 768); k = 768 for qkv (2304 x 768), proj, fc1 and fc2
    want = 48 * (2 * r + 2 * (768 - r) * 256)
    assert vpeft.apply_method(copy.deepcopy(vit_b16), "salt", ratio=0.1).trainable == want == 17_013_888


def test_sam_vit_b_default_count_is_the_papers(monkeypatch):
    """The default on segment_anything's SAM ViT-B against a count from the module shapes and the SAM1 file's ranks:
    760 of k on attn.qkv / attn.proj, 50 on mlp.lin1 / mlp.lin2, r_lora 256."""
    monkeypatch.setattr(_svd, "svd", fake_svd)
    from vpeft.backbones import build_backbone

    encoder = build_backbone("sam:vit_b", img_size=64).model  # the linear shapes do not depend on the input size
    official_rank = {"attn.qkv": 760, "attn.proj": 760, "mlp.lin1": 50, "mlp.lin2": 50}
    want = 0
    for name, module in encoder.named_modules():
        layer = next((rank for suffix, rank in official_rank.items() if name.endswith(suffix)), None)
        if layer is not None:
            k = min(module.weight.shape)
            want += 2 * layer + 2 * (k - layer) * 256
    report = vpeft.apply_method(encoder, "salt")
    assert report.trainable == want == 8_959_968  # the docstring's 12 * (2 * 5,616 + 2 * 367,716)
    assert len(report.rows) == 48


def test_ratio_per_role_and_a_target_without_one():
    model = tiny_vit()  # width 64, mlp 256: k = 64 everywhere
    vpeft.apply_method(model, "salt", r_lora=4, ratio={"qkv": 0.5, "attn.proj": 0.25, "mlp_in": 0.1, "fc2": 0.9})
    block = model.blocks[0]
    ranks = {name: next(iter(module.adapters["default"].values())).r
             for name, module in (("qkv", block.attn.qkv), ("proj", block.attn.proj), ("fc1", block.mlp.fc1),
                                  ("fc2", block.mlp.fc2))}  # fmt: skip
    assert ranks == {"qkv": 32, "proj": 16, "fc1": 6, "fc2": 57}  # floor(ratio * 64)
    with pytest.raises(ValueError, match="no entry for target 'blocks.0.mlp.fc1'.*add its role"):
        vpeft.apply_method(tiny_vit(), "salt", ratio={"qkv": 0.5, "attn_out": 0.5, "mlp_out": 0.5})
    with pytest.raises(ValueError, match=r"option 'ratio'.*qkv: Input should be less than 1"):
        vpeft.apply_method(tiny_vit(), "salt", ratio={"qkv": 1.5})
