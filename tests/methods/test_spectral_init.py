"""PiSSA, CorDA and LoRA-GA against hand computations of their papers' equations on a two-layer model (float64
references), the non-destructive residual (base weights untouched, merge/unmerge exact), the calibration cache and
the export to a rank-2r LoRA that ``import_hf_peft`` reads back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import layers_of
from vpeft.methods.corda import damped_inverse

from ._two_layers import TwoLayers

CALLS: list[int] = []  # module-level, so the calibration items' fingerprints do not change as they count


def model() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayers(d_in=12, hidden=10, d_out=8).eval()


def items(count: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(16, 12, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(count)]

    def loss(m, x, y):
        CALLS.append(1)
        return nn.functional.cross_entropy(m(x), y)

    return [lambda m, x=x, y=y: loss(m, x, y) for x, y in pairs]


OPTIONS = {"targets": ("fc1", "fc2"), "head": (), "r": 3, "alpha": 6.0}


def factors(net: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    layers = layers_of(net, "default")
    return {name: (m.A0.double(), m.B0.double(), m.scale) for name, m in zip(("fc1", "fc2"), layers, strict=True)}


def test_pissa_takes_the_best_rank_r_approximation():
    base = model()
    net = copy.deepcopy(base)
    vpeft.apply_method(net, "pissa", **OPTIONS)
    for name, (A0, B0, s) in factors(net).items():
        W = getattr(base, name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(s * B0 @ A0, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=0, atol=2e-6)
        torch.testing.assert_close(B0.T @ B0, A0 @ A0.T, rtol=0, atol=1e-6)  # both diag(S_r / s)
        rest = torch.linalg.svdvals(W - s * B0 @ A0)[: len(S) - 3]  # the residual keeps the other triplets
        torch.testing.assert_close(rest, S[3:], rtol=0, atol=2e-6)


def test_pissa_fast_svd_is_seeded_and_close():
    nets = [copy.deepcopy(model()) for _ in range(2)]
    for net in nets:
        vpeft.apply_method(net, "pissa", niter=8, **OPTIONS)
    (a1, b1, _), (a2, b2, _) = factors(nets[0])["fc1"], factors(nets[1])["fc1"]
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    W = model().fc1.weight.detach().double()
    S = torch.linalg.svdvals(W)
    s = OPTIONS["alpha"] / OPTIONS["r"]
    # a randomised rank-3 approximation (q = r, PEFT's pissa_niter_k): close to the best one, Eckart-Young's error
    assert torch.linalg.norm(W - s * b1 @ a1) <= 1.01 * S[3:].square().sum().sqrt()  # measured 1.0001; W: 1.68


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_decomposes_w_along_the_input_covariance(mode):
    base = model()
    net = copy.deepcopy(base)
    vpeft.apply_method(net, "corda", calibration=items(), mode=mode, **OPTIONS)
    xs = [c.__defaults__[0] for c in items()]  # the calibration inputs, for the reference covariance
    for name, (A0, B0, s) in factors(net).items():
        W = getattr(base, name).weight.detach().double()
        inputs = xs if name == "fc1" else [torch.tanh(base.fc1(x)).detach() for x in xs]
        C = sum((x.double() / x.double().max().abs()).T @ (x.double() / x.double().max().abs()) for x in inputs) / 4
        fixed, inv = damped_inverse(C)
        U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
        keep = slice(0, 3) if mode == "ipm" else slice(len(S) - 3, len(S))
        expected = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep] @ inv  # the r chosen triplets of W C, mapped back
        torch.testing.assert_close(s * B0 @ A0, expected, rtol=0, atol=5e-5 * W.abs().max().item())


def test_corda_ipm_and_kpm_split_w():
    """The r largest (ipm) and the k - r smallest (kpm) triplets of the same decomposition add up to W."""
    base = model()
    parts = {}
    for mode, r in (("ipm", 3), ("kpm", 5)):  # fc2 is 8 x 10: k = 8
        net = copy.deepcopy(base)
        vpeft.apply_method(net, "corda", calibration=items(), mode=mode, **{**OPTIONS, "r": r, "alpha": float(r)})
        parts[mode] = factors(net)["fc2"]
    total = sum(s * B @ A for A, B, s in parts.values())
    torch.testing.assert_close(total, base.fc2.weight.double(), rtol=0, atol=1e-4)


def test_lora_ga_starts_along_the_gradient_subspace():
    base = model()
    net = copy.deepcopy(base)
    vpeft.apply_method(net, "lora_ga", calibration=items(), scale="unit", **OPTIONS)
    params = [base.fc1.weight, base.fc2.weight]
    grads = [torch.zeros_like(p) for p in params]
    for item in items():
        for g, d in zip(grads, torch.autograd.grad(item(base), params), strict=True):
            g += d / 4
    for (A0, B0, _), G in zip(factors(net).values(), grads, strict=True):
        U, S, Vh = torch.linalg.svd(G.double())
        # A0 spans the top-r right singular vectors, B0 = U_{r+1..2r} diag(S_{r+1..2r}) (direction ArB2r)
        torch.testing.assert_close(A0.T @ A0, Vh[:3].T @ Vh[:3], rtol=0, atol=1e-5)
        torch.testing.assert_close(B0 @ B0.T, U[:, 3:6] @ torch.diag(S[3:6] ** 2) @ U[:, 3:6].T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["pissa", "corda", "lora_ga"])
def test_base_untouched_and_merge_exact(method):
    base = model()
    net = copy.deepcopy(base)
    vpeft.apply_method(net, method, calibration=items(), **OPTIONS)
    x = torch.randn(5, 12)
    assert torch.equal(net(x), base(x))  # exactly the base at init
    with torch.no_grad():
        for layer in layers_of(net, "default"):
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
    assert torch.equal(net.fc1.base_layer.weight, base.fc1.weight)
    with vpeft.disabled(net):
        assert torch.equal(net(x), base(x))
    expected = net(x)
    vpeft.merge(net)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
    vpeft.unmerge(net)
    torch.testing.assert_close(net.fc1.base_layer.weight, base.fc1.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["corda", "lora_ga"])
def test_calibration_cache_serves_a_sweep(method, tmp_path):
    nets = [copy.deepcopy(model()) for _ in range(3)]
    data = items()
    CALLS.clear()
    vpeft.apply_method(nets[0], method, calibration=data, calibration_cache=str(tmp_path), **OPTIONS)
    computed = len(CALLS)
    vpeft.apply_method(nets[1], method, calibration=data, calibration_cache=str(tmp_path), **{**OPTIONS, "r": 2})
    assert computed == 4 and len(CALLS) == 4  # the second apply (another rank) read the file
    vpeft.apply_method(nets[2], method, calibration=data, calibration_cache=str(tmp_path), **OPTIONS)
    assert len(CALLS) == 4 and len(list(tmp_path.iterdir())) == 1
    for a, b in zip(layers_of(nets[0], "default"), layers_of(nets[2], "default"), strict=True):
        assert torch.equal(a.A0, b.A0) and torch.equal(a.B0, b.B0)


def test_export_is_a_rank_2r_lora_that_imports_back(tmp_path):
    base = model()
    net = copy.deepcopy(base)
    vpeft.apply_method(net, "pissa", **OPTIONS)
    with torch.no_grad():
        for layer in layers_of(net, "default"):
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    vpeft.export_hf_peft(net, tmp_path / "hf")
    back = copy.deepcopy(base)
    vpeft.import_hf_peft(back, tmp_path / "hf")
    assert vpeft.core.adapter_record(back).method == "lora"
    assert [layer.lora_A.shape[0] for layer in layers_of(back, "default")] == [6, 6]
    x = torch.randn(5, 12)
    torch.testing.assert_close(back(x), net(x), rtol=1e-6, atol=1e-6)
