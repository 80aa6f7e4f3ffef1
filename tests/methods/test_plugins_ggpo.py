"""LoRA-GGPO (vpeft/plugins/ggpo.py): the perturbation's row scale against a hand computation from the merged
weight's and its gradient's row norms (the gradient taken by autograd on a separate model whose base weight trains),
and a step that applies an ordinary optimiser step to the perturbed point's gradient with nothing of the noise left
in the weights or the saved adapter."""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft.core import WHOLE, adapted_modules, layers_of, plugins_of

from ..conftest import perturb
from ..lm.models import batches, task_loss, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA, ALPHA, BETA = 0.1, 0.7, 1e4  # beta large: on the tiny model ||G_i||^2 ~ 1e-6 against ||W_i||^2 ~ 0.02


def with_ggpo(build=tiny_llama, **options):
    model = build()
    vpeft.apply_method(model, "lora", plugins=[{"name": "ggpo", "sigma": SIGMA, "alpha": ALPHA, "beta": BETA}])
    perturb(model)  # B != 0: the merged weight differs from W0
    return model


def twin(model, build=tiny_llama):
    """The same LoRA model without the plug-in: an independent place to compute what GGPO should do."""
    other = build()
    vpeft.apply_method(other, "lora")
    other.load_state_dict(model.state_dict())
    return other


def merged_by_hand(model) -> dict[str, torch.Tensor]:
    out = {}
    for adapted in adapted_modules(model, "default"):
        layer = adapted.parts[WHOLE]
        a, b, scale = layer.lora_factors()
        out[adapted.path] = adapted.base.weight.detach() + scale * b.detach() @ a.detach()
    return out


def test_row_scale_follows_the_weight_and_gradient_norms():
    model = with_ggpo()
    ggpo = plugins_of(model)["ggpo"]
    merged = merged_by_hand(model)
    batch = batches(1)[0]
    vpeft.perturb(model)
    for path, w in merged.items():  # first step: no gradient yet, the weight term alone
        want = SIGMA * (ALPHA * (w**2).sum(1) / w.shape[1]).sqrt()
        torch.testing.assert_close(ggpo.last_scale[path], want, rtol=1e-5, atol=0)
    noise = {site.path: site.noise.clone() for site in ggpo.sites}
    with vpeft.loss_context(model, batch):
        loss, _ = task_loss(model, batch)
    loss.backward()
    vpeft.restore(model)
    # the gradient with respect to the merged weight at the perturbed point, by autograd: a twin whose base weights
    # carry the same noise and train
    ref = twin(model)
    bases = {a.path: a.base for a in adapted_modules(ref, "default")}
    with torch.no_grad():
        for path, eps in noise.items():
            bases[path].weight.add_(eps)
    for base in bases.values():
        base.weight.requires_grad_(True)
    ref_loss, _ = task_loss(ref, batch)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    vpeft.perturb(model)  # second step: the first step's gradient guides the noise
    for path, w in merged.items():
        g = bases[path].weight.grad
        torch.testing.assert_close(ggpo.last_grad[path], g, rtol=1e-4, atol=1e-7)
        want = SIGMA * ((ALPHA * (w**2).sum(1) + BETA * (g**2).sum(1)) / w.shape[1]).sqrt()
        torch.testing.assert_close(ggpo.last_scale[path], want, rtol=1e-4, atol=0)
        assert (BETA * (g**2).sum(1)).max() > 0.05 * (ALPHA * (w**2).sum(1)).max()  # the gradient term counts
    vpeft.restore(model)
    # the noise is Gaussian with that row scale: standardised, mean about 0 and variance about 1
    standard = torch.cat([(noise[p] / (SIGMA * (ALPHA * (w**2).sum(1) / w.shape[1]).sqrt())[:, None]).flatten()
                          for p, w in merged.items()])  # fmt: skip
    assert abs(standard.mean().item()) < 0.05 and abs(standard.var().item() - 1) < 0.1


def test_the_step_is_an_optimiser_step_on_the_perturbed_gradient_and_nothing_leaks(tmp_path):
    model = with_ggpo()
    ref = twin(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = batches(1)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    vpeft.perturb(model)
    noise = {site.path: site.noise.clone() for site in plugins_of(model)["ggpo"].sites}
    assert all(n.abs().sum() > 0 for n in noise.values())
    with vpeft.loss_context(model, batch):
        loss, _ = task_loss(model, batch)
    loss.backward()
    vpeft.restore(model)
    optimizer.step()
    # by hand: the twin with the noise in its base weights, its LoRA gradient, one SGD step
    bases = {a.path: a.base for a in adapted_modules(ref, "default")}
    with torch.no_grad():
        for path, eps in noise.items():
            bases[path].weight.add_(eps)
    ref_loss, _ = task_loss(ref, batch)
    ref_loss.backward()
    after = model.state_dict()
    for (name, p), (ref_name, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert name == ref_name
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[name] - 0.5 * q.grad, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(after[name], before[name]), name  # base weights bit-identical: no noise left
    # the unperturbed model answers as the plain LoRA model with the stepped tensors
    plain = twin(model)
    with torch.no_grad():
        torch.testing.assert_close(task_loss(model, batch)[1], task_loss(plain, batch)[1], rtol=0, atol=0)
    vpeft.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    layers = layers_of(model, "default")
    assert torch.equal(saved[f"model.layers.0.self_attn.q_proj.{WHOLE}.lora_A"], layers[0].lora_A.detach())


def test_fused_projection_perturbs_only_the_adapted_slices():
    model = with_ggpo(tiny_gpt2)  # LoRA on c_attn's q and v slices: k's rows keep no noise
    ggpo = plugins_of(model)["ggpo"]
    vpeft.perturb(model)
    site = next(s for s in ggpo.sites if s.path.endswith("attn.c_attn"))
    width = site.noise.shape[0] // 3
    assert torch.equal(site.noise[width : 2 * width], torch.zeros_like(site.noise[width : 2 * width]))
    assert site.noise[:width].abs().sum() > 0 and site.noise[2 * width :].abs().sum() > 0
    vpeft.restore(model)
    assert all(s.noise is None for s in ggpo.sites)


def test_ggpo_refuses_an_adapter_without_weight_matrices():
    with pytest.raises(vpeft.errors.ConfigError, match="ggpo perturbs the weight matrices"):
        vpeft.apply_method(tiny_llama(), "ln_tune", plugins=[{"name": "ggpo"}])
