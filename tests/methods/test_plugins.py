"""Plug-ins beside an adapter and the loss context: DEFT's density loss and BA-LoRA's regularisers against their
formulas computed here, on hand-made activations and logits and on the tiny language models; saved, loaded, named,
refused. GGPO: test_plugins_ggpo.py."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import LossContext, plugins_of
from vpeft.errors import ConfigError, UnknownNameError
from vpeft.plugins import build_plugins
from vpeft.plugins.ba_lora import consistency_nlg, consistency_nlu, diversity_nlg, diversity_nlu, svd_share
from vpeft.plugins.density_loss import density, density_penalty

from ..conftest import perturb
from ..lm.models import batches, task_loss, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- density_loss ----------------------------------------------------------------------------------------------------
def test_density_penalty_and_density_on_hand_made_activations():
    a = torch.tensor([[0.0, 1.0], [1e-4, -2.0]])  # one layer
    b = torch.tensor([[[0.0, 0.0, 3.0]]])  # another, (1, 1, 3)
    eps = 1e-7
    # per entry a^2/(a^2+eps): 0, ~1, 1e-8/(1e-8+1e-7) = 1/11, ~1; the layer's mean, then the mean over layers
    first = (0 + 1 / (1 + eps) + (1e-8 / 1.1e-7) + 4 / (4 + eps)) / 4
    second = (9 / (9 + eps)) / 3
    assert density_penalty([a, b], eps).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert density([a, b]) == pytest.approx(4 / 7)  # non-zeros: 1, 1e-4, -2, 3 of 7 entries
    assert density([a, b], threshold=1e-3) == pytest.approx(3 / 7)
    # a mask keeps only the listed tokens: row 0 of a
    mask = torch.tensor([True, False])
    assert density_penalty([a], eps, [mask]).item() == pytest.approx((1 / (1 + eps)) / 2, rel=1e-6)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_llama])
def test_density_loss_reads_the_mlp_activations_of_the_step(build):
    base = build()
    model = copy.deepcopy(base)
    report = vpeft.apply_method(model, "lora", plugins=[{"name": "density_loss", "weight": 0.5, "eps": 1e-3}])
    assert "plug-in density_loss" in str(report) and "'weight': 0.5" in str(report)
    batch = batches(1)[0]
    # the same activations, independently: the inputs of each block's MLP down projection, by hooks on the base model
    seen = []
    ends = ("output.dense", "mlp.c_proj", "mlp.down_proj")
    downs = [m for n, m in base.named_modules() if n.endswith(ends) and "attention" not in n]
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for m in downs]
    with torch.no_grad():
        task_loss(base, batch)
    for h in handles:
        h.remove()
    assert len(seen) == 2  # two blocks
    mask = batch["attention_mask"].bool()
    want = torch.stack([(a**2 / (a**2 + 1e-3))[mask].mean() for a in seen]).mean() * 0.5
    with vpeft.loss_context(model, batch) as context:
        task_loss(model, batch)  # LoRA's B is zero: the adapted model's activations are the base's
    got = vpeft.method_loss(model, context=context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert vpeft.method_loss(model, context=context) is None  # taken once; outside a step nothing is kept
    with torch.no_grad():
        task_loss(model, batch)
    assert vpeft.method_loss(model) is None


def test_density_loss_trains_the_activations_down():
    """Measured on the tiny BERT: 30 steps of the density loss alone lower the surrogate and the density of GELU
    activations (|a| > 0.01). With the code's eps = 1e-7 the surrogate is flat for a GELU MLP (about 1 wherever
    |a| >> 3e-4, which a GELU output nearly always is): measured, 0.991 -> 0.981 in the same 30 steps, density
    unchanged; eps = 1e-2 gives the loss a slope at the activations' scale."""
    model = tiny_bert()
    plugin = {"name": "density_loss", "weight": 1.0, "eps": 1e-2}
    vpeft.apply_method(model, "lora", targets=("mlp_in",), r=4, plugins=[plugin])
    tap = plugins_of(model)["density_loss"].tap
    batch = batches(1)[0]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    values = []
    for _ in range(30):
        with vpeft.loss_context(model, batch) as context:
            task_loss(model, batch)
        kept = list(tap.kept)
        loss = vpeft.method_loss(model, context=context)
        values.append((loss.item(), density(kept, 1e-2)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert values[-1][0] < 0.6 * values[0][0] and values[-1][1] < values[0][1] - 0.05, values


# ---- ba_lora ---------------------------------------------------------------------------------------------------------
def test_ba_lora_terms_on_hand_made_logits():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [1.0, -1.0, 3.0], [0.0, 0.2, 0.1]])
    r = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 2.0], [0.3, 0.0, 0.0]])
    # understanding: MSE of L2-normalised rows
    zn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in z.tolist()]
    rn = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in r.tolist()]
    mse = sum((a - b) ** 2 for ra, rb in zip(zn, rn, strict=True) for a, b in zip(ra, rb, strict=True)) / 12
    assert consistency_nlu(z, r).item() == pytest.approx(mse, rel=1e-5)
    # covariance off-diagonal energy / d, the covariance with numpy's unbiased estimator
    cov = np.cov(z.numpy(), rowvar=False)
    off = cov - np.diag(np.diag(cov))
    assert diversity_nlu(z).item() == pytest.approx((off**2).sum() / 3, rel=1e-5)
    # SVD share of the top k singular values, negated (numpy's SVD)
    s = np.linalg.svd(z.numpy(), compute_uv=False)
    assert svd_share(z, 1).item() == pytest.approx(-s[0] / s.sum(), rel=1e-5)
    assert svd_share(z, 2).item() == pytest.approx(-(s[0] + s[1]) / s.sum(), rel=1e-5)
    # generation: per-token KL(p_ref || p), mean over tokens; entropy negated
    zt, rt = z.view(2, 2, 3), r.view(2, 2, 3)
    p = np.exp(z.numpy()) / np.exp(z.numpy()).sum(1, keepdims=True)
    q = np.exp(r.numpy()) / np.exp(r.numpy()).sum(1, keepdims=True)
    assert consistency_nlg(zt, rt).item() == pytest.approx((q * np.log(q / p)).sum(1).mean(), rel=1e-5)
    assert diversity_nlg(zt).item() == pytest.approx((p * np.log(p)).sum(1).mean(), rel=1e-5)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_ba_lora_uses_the_disabled_adapter_as_reference_without_a_copy(build):
    base = build()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "lora", plugins=[{"name": "ba_lora", "consistency": 1.0, "diversity": 2.0, "svd": 3.0}])
    perturb(model)
    storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    nbytes = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    batch = batches(1)[0]
    model.train()
    with vpeft.loss_context(model, batch) as context:
        _, logits = task_loss(model, batch)
    got = vpeft.method_loss(model, context=context)
    with torch.no_grad():
        _, ref = task_loss(base, batch)  # the base model, a separate copy here only to check against
    if logits.dim() == 2:
        want = consistency_nlu(logits, ref) + 2 * diversity_nlu(logits) + 3 * svd_share(logits, 10)
    else:
        want = consistency_nlg(logits, ref) + 2 * diversity_nlg(logits) + 3 * svd_share(logits, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()  # the regularisers train the adapter: gradient reaches LoRA's tensors
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    assert model.training  # the reference pass ran in evaluation mode and put the mode back
    assert {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]} == storage
    assert sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]) == nbytes


def test_ba_lora_refuses_a_method_without_a_base_to_return_to():
    with pytest.raises(ConfigError, match="ba_lora needs the pre-trained model"):
        vpeft.apply_method(tiny_bert(), "full", plugins=[{"name": "ba_lora"}])


# ---- the mechanism: context, saving, loading, refusals --------------------------------------------------------------
def test_loss_context_records_the_outermost_call():
    model = tiny_gpt2()
    vpeft.apply_method(model, "lora")
    batch = batches(1)[0]
    with vpeft.loss_context(model, batch) as context:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert context.outputs is out and context.batch is batch and torch.equal(context.logits, out.logits)
    assert torch.equal(context.kwargs["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(context.rerun().logits, out.logits)
    with pytest.raises(ValueError, match="no outputs"):
        _ = LossContext(model).logits


def test_a_method_loss_may_read_the_context(monkeypatch):
    """A method whose loss names ``context`` gets it; the three-argument ones (KaSA...) keep working unchanged."""
    from vpeft.methods.lora import LoRA

    seen = {}

    def loss(cls, config, layers, shared, context=None):
        seen["context"] = context
        return context.logits.sum() * 0

    monkeypatch.setattr(LoRA, "loss", classmethod(loss))
    model = tiny_bert()
    vpeft.apply_method(model, "lora")
    batch = batches(1)[0]
    with vpeft.loss_context(model, batch) as context:
        task_loss(model, batch)
    assert vpeft.method_loss(model, context=context).item() == 0 and seen["context"] is context
    kasa = tiny_llama()
    vpeft.apply_method(kasa, "kasa", r=2)
    assert vpeft.method_loss(kasa, context=context) is not None


def test_plugins_are_saved_loaded_and_named(tmp_path):
    model = tiny_llama()
    plugins = [{"name": "density_loss", "weight": 0.25}, {"name": "ba_lora", "svd": 0.0}]
    vpeft.apply_method(model, "lora", plugins=plugins)
    vpeft.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert [p["name"] for p in meta["plugins"]] == ["density_loss", "ba_lora"]
    assert meta["plugins"][0]["options"]["weight"] == 0.25 and meta["plugins"][1]["options"]["svd"] == 0.0
    fresh = tiny_llama()
    report = vpeft.load_adapter(fresh, tmp_path / "a")
    loaded = plugins_of(fresh)
    assert list(loaded) == ["density_loss", "ba_lora"] and loaded["density_loss"].config.weight == 0.25
    assert "plug-in density_loss" in str(report) and "plug-in ba_lora" in str(report)
    vpeft.delete_adapter(fresh, "default")  # its hooks go with it
    assert all(not m._forward_pre_hooks for m in fresh.modules())


def test_without_plugins_nothing_changes(tmp_path):
    model = tiny_bert()
    report = vpeft.apply_method(model, "lora")
    assert plugins_of(model) == {} and "plug-in" not in str(report)
    vpeft.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["plugins"] == []


@pytest.mark.parametrize(
    ("specs", "error", "words"),
    [
        ([{"name": "density_los"}], UnknownNameError, ["unknown plug-in 'density_los'", "density_loss"]),
        ([{"name": "deft"}], UnknownNameError, ["unknown plug-in 'deft'", "Valid names: ba_lora, density_loss, ggpo"]),
        ([{"weight": 1.0}], ConfigError, ["plugins[0] must be a mapping with a name"]),
        ({"name": "ggpo"}, ConfigError, ["plugins must be a list of mappings"]),
        ([{"name": "ggpo"}, {"name": "ggpo"}], ConfigError, ["listed twice"]),
        ([{"name": "density_loss", "weight": -1.0}], ConfigError, ["weight"]),
        ([{"name": "ba_lora", "lambda1": 1.0}], ConfigError, ["lambda1"]),
    ],
)
def test_plugin_mistakes_are_refused_in_one_paragraph_and_the_model_is_unchanged(specs, error, words):
    with pytest.raises(error) as caught:
        build_plugins(specs)
    for word in words:
        assert word in str(caught.value)
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        vpeft.apply_method(model, "lora", plugins=specs)
    assert not any(".adapters." in n for n, _ in model.named_parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_density_loss_refuses_targets_that_match_nothing():
    model = tiny_bert()
    with pytest.raises(ConfigError, match="density_loss: targets .* match no module"):
        vpeft.apply_method(model, "lora", plugins=[{"name": "density_loss", "targets": ["nowhere"]}])
    assert not any(".adapters." in n for n, _ in model.named_parameters())  # the adapter went again


def test_kl_matches_torch_kl_div():
    z, r = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    want = F.kl_div(F.log_softmax(z, -1), F.log_softmax(r, -1), log_target=True, reduction="sum") / 10
    torch.testing.assert_close(consistency_nlg(z, r), want)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_plugins_run_with_virtual_tokens(method):
    """BA-LoRA's reference pass goes through the call rewrite again, disabled: the base model's logits; the density
    loss taps the MLPs with the virtual tokens in (no mask of that length: every position counts)."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    plugins = [{"name": "ba_lora", "consistency": 1.0, "diversity": 0.0, "svd": 0.0}, {"name": "density_loss"}]
    vpeft.apply_method(model, method, num_virtual_tokens=4, plugins=plugins)
    batch = batches(1)[0]
    with vpeft.loss_context(model, batch) as context:
        _, logits = task_loss(model, batch)
    reference = plugins_of(model)["ba_lora"].reference(context)
    with torch.no_grad():
        _, want = task_loss(base, batch)
    torch.testing.assert_close(reference, want)
    got = vpeft.method_loss(model, context=context)
    density_term = plugins_of(model)["density_loss"].config.weight  # times a mean of values in [0, 1]
    assert 0 < got.item() - consistency_nlg(logits, want).item() <= density_term + 1e-6
