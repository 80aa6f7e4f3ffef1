"""Differential privacy against independent computations: DP-SGD's per-example gradients (by torch.func.vmap, not
the loop of vpeft.federated.dp_sgd_gradient) clipped to C by hand; the noise's spread; DP-FedAvg's clipped client
updates; and the accountant's epsilon against opacus's own RDP analysis for the same noise, rate and steps, and at
sampling rate 1 against the Gaussian mechanism's closed-form RDP, T * a / (2 sigma^2), converted by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vpeft.errors import ConfigError
from vpeft.federated import Accountant, dp_fedavg, dp_sgd_gradient

opacus = pytest.importorskip("opacus", reason="the DP accountant needs opacus (pip install 'vpeft[dp]')")


def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(12, 5) * torch.linspace(0.1, 4, 12)[:, None]  # examples of very different gradient norms
    y = torch.randint(0, 3, (12,))
    return model, x, y


def per_example_grads(model, x, y) -> list[torch.Tensor]:
    """(examples, *shape) per parameter, by vmap over torch.func.grad."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [grads[k] for k, _ in model.named_parameters()]


@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_dp_sgd_without_noise_is_the_mean_of_clipped_per_example_gradients(clip):
    model, x, y = tiny()
    params = list(model.parameters())
    norms = dp_sgd_gradient(
        params, lambda i: nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), len(x), clip, 0.0,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    grads = per_example_grads(model, x, y)
    flat = torch.cat([g.flatten(1) for g in grads], 1).double()
    expected_norms = flat.norm(dim=1)
    torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), expected_norms, rtol=1e-5, atol=1e-7)
    factors = torch.clamp(clip / expected_norms, max=1.0)
    clipped = flat * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-9)).all()  # the per-example bound
    expected = clipped.sum(0) / len(x)
    got = torch.cat([p.grad.flatten() for p in params]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    if clip == 0.05:
        assert (expected_norms > clip).all()  # every example was clipped: the bound was active


def test_dp_sgd_noise_has_std_sigma_c_over_batch():
    w = nn.Parameter(torch.zeros(40_000))
    dp_sgd_gradient([w], lambda i: (w * 0).sum(), 4, 0.5, 2.0, torch.Generator().manual_seed(1), expected_batch=8)
    assert float(w.grad.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(w.grad.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.02)


def test_dp_fedavg_clips_each_client_update_and_averages():
    g = torch.Generator().manual_seed(2)
    server = {"b": torch.randn(6, 3, generator=g), "a": torch.randn(3, 4, generator=g)}
    clients = [{k: v + s * torch.randn(v.shape, generator=g) for k, v in server.items()} for s in (0.01, 1.0, 3.0)]
    clip = 0.5
    out, norms = dp_fedavg(server, clients, clip, 0.0, torch.Generator().manual_seed(0), keys=["b"])
    updates = [c["b"].double() - server["b"].double() for c in clients]
    assert norms == pytest.approx([float(u.norm()) for u in updates])
    clipped = [u * min(1.0, clip / float(u.norm())) for u in updates]
    assert all(float(c.norm()) <= clip + 1e-9 for c in clipped)
    torch.testing.assert_close(out["b"].double(), server["b"].double() + sum(clipped) / 3, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["a"], server["a"])  # not a trained key


@pytest.mark.parametrize("sigma,rate,steps", [(1.1, 0.01, 300), (0.8, 0.25, 20), (2.0, 1.0, 5)])
def test_accountant_epsilon_equals_opacus_rdp_analysis(sigma, rate, steps):
    from opacus.accountants.analysis import rdp as analysis
    from opacus.accountants.rdp import RDPAccountant

    acc = Accountant()
    for _ in range(steps):
        acc.step(sigma, rate)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert acc.epsilon(1e-5) == pytest.approx(eps, rel=1e-9)
    assert acc.history == [(sigma, rate, steps)]


def test_accountant_at_rate_one_matches_the_gaussian_mechanism_closed_form():
    """Without subsampling the RDP of T Gaussian mechanisms of noise multiplier sigma is T a / (2 sigma^2) (Mironov
    2017, Prop. 7 and 1); converted to (epsilon, delta) with Balle et al. 2020, Thm. 21."""
    from opacus.accountants.rdp import RDPAccountant

    sigma, steps, delta = 3.0, 10, 1e-6
    acc = Accountant()
    for _ in range(steps):
        acc.step(sigma, 1.0)
    best = min(
        steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    assert acc.epsilon(delta) == pytest.approx(best, rel=1e-9)


def test_accountant_edge_cases_and_mistakes():
    acc = Accountant()
    assert acc.epsilon(1e-5) == 0.0
    acc.step(0.0, 0.5)
    assert acc.epsilon(1e-5) == math.inf  # no noise: no privacy
    with pytest.raises(ConfigError, match="sampling rate"):
        acc.step(1.0, 0.0)
