"""PiSSA, CorDA (ipm, kpm) and LoRA-GA equal Hugging Face PEFT's ``init_lora_weights="pissa"`` / ``"corda"`` /
``"lora_ga"`` on the tiny Llama: same data, 5 AdamW steps, the same logits within 1e-5, and the exported rank-2r
LoRA gives the vpeft model's logits in PEFT. LoRA-GA's gradient estimate equals PEFT's ``preprocess_loraga``'s.

PEFT writes ``W - s B0 A0`` into the base weight; vpeft keeps W and subtracts ``s B0 A0 x`` (frozen buffers), so
agreement here means both the initial factors and the residual agree. The harness copies vpeft's initial trainable
A, B into PEFT's model, which only keeps PEFT's own residual consistent when the two libraries' ``B0 A0`` agree:
PiSSA and CorDA are sign-invariant products of singular triplets; LoRA-GA's is not (A0 and B0 take different
triplets), so PEFT's ``lora_ga_init`` runs per layer under the seed vpeft uses for that target.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

import vpeft
from vpeft.core import layers_of
from vpeft.methods.corda import corda_factors
from vpeft.methods.lora_ga import LoRAGAConfig, estimate_gradients

from .equivalence import peft, train_side_by_side
from .models import batches, task_loss, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "o_proj"]
OPTIONS = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": TARGETS, "head": ()}


def lora_config(**extra) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM", **extra)


def one_sequence_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches of one sequence (PEFT's CorDA hook takes one per forward call), 24 tokens each: 8 give 192 rows of
    input for 32-wide layers, a covariance well enough conditioned that float32 rounding in the two libraries' sums
    (vpeft: float64) stays below the tolerance after its inversion."""
    return batches(count, seed=seed, batch=1, length=24)


def losses(data: list[dict[str, torch.Tensor]]) -> list:
    return [lambda model, b=b: task_loss(model, b)[0] for b in data]


def check(report, tensor_tol: float = 1e-5) -> None:
    assert report.moved > 1e3 * 1e-5, "training barely moved the logits: agreement within 1e-5 would prove nothing"
    assert report.logit_diffs[0] <= 1e-5, report.logit_diffs  # the two residuals agree before training
    assert max(report.logit_diffs) <= 1e-5, report.logit_diffs
    assert report.tensor_diff <= tensor_tol * max(1.0, report.tensor_scale), (report.tensor_diff, report.tensor_scale)
    assert report.export_diff <= 1e-5


def test_pissa_trains_as_peft_does(tmp_path):
    report = train_side_by_side(
        tiny_llama, "pissa", OPTIONS, lora_config(init_lora_weights="pissa"), export_dir=tmp_path / "peft"
    )
    check(report)


# CorDA on every linear layer but o_proj: the tiny GQA Llama's attention output (4 query heads over 2 key/value heads)
# has an input covariance of condition ~1e6, where PEFT's float32 sum of X^T X (vpeft sums in float64) alone moves
# the ipm factors by 6e-5 of |B A| and the logits after training by 1.2e-5. Given PEFT's own covariance, vpeft's
# factors equal PEFT's bit for bit on every layer, o_proj included (test_corda_factors_from_peft_covariance).
CORDA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def corda_config(mode: str, targets: list[str], **extra) -> peft.LoraConfig:
    corda = importlib.import_module("peft.tuners.lora.config").CordaConfig(corda_method=mode, **extra)
    return peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM", init_lora_weights="corda",
        corda_config=corda,
    )  # fmt: skip


def peft_corda(model, data, config):
    def run_model():
        for b in data:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    importlib.import_module("peft.tuners.lora.corda").preprocess_corda(model, config, run_model=run_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_trains_as_peft_does(mode, tmp_path):
    pytest.importorskip("attr", reason="peft's CorDA module imports attrs (the test extra installs it)")
    data = one_sequence_batches(8, seed=7)
    config = corda_config(mode, CORDA_TARGETS)

    options = {**OPTIONS, "mode": mode, "targets": CORDA_TARGETS}
    report = train_side_by_side(
        tiny_llama, "corda", options, config, export_dir=tmp_path / "peft", calibration=losses(data),
        make_theirs=lambda model: peft_corda(model, data, config),
    )  # fmt: skip
    # The residuals differ by float32 rounding (the covariance sums), ~1e-7 of |B A|; AdamW divides each gradient
    # by its own running RMS, so entries whose gradient is near zero turn that into steps of up to lr: the trained
    # tensors then differ by up to 4e-4 of their largest entry (measured 1.2e-4 ipm, 3.8e-4 kpm) while the logits
    # stay within 1e-5.
    check(report, tensor_tol=1e-3)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_factors_from_peft_covariance(mode):
    """vpeft's decomposition (damped inverse, SVD, crop, scale) of PEFT's own covariance is PEFT's, exactly."""
    pytest.importorskip("attr", reason="peft's CorDA module imports attrs (the test extra installs it)")
    data = one_sequence_batches(8, seed=7)
    config = corda_config(mode, TARGETS, prune_temporary_fields=False)
    weights = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}  # PEFT overwrites W with W_res
    theirs = peft_corda(tiny_llama(), data, config)
    params = dict(theirs.named_parameters())
    layers = [(n, m) for n, m in theirs.named_modules() if hasattr(m, "covariance_matrix")]
    assert len(layers) == 6
    for name, module in layers:  # name: ...q_proj.base_layer, the module PEFT hooked
        path = name.removesuffix(".base_layer")
        A, B = corda_factors(
            weights[path.removeprefix("base_model.model.") + ".weight"], module.covariance_matrix, 4, 2.0, mode
        )
        assert torch.equal(A, params[f"{path}.lora_A.default.weight"])
        assert torch.equal(B, params[f"{path}.lora_B.default.weight"])


def peft_loraga(model, data, config, seed: int = 0):
    """PEFT's LoRA-GA on ``model``: its gradient estimate, then its ``lora_ga_init`` per layer, seeded as vpeft seeds
    each target (seed + position in model order), so both libraries draw the same randomised SVD."""
    peft.tuners.lora.preprocess_loraga(
        model, config, train_step=lambda: [task_loss(model, b)[0].backward() for b in data]
    )
    plain = copy.deepcopy(config)
    plain.init_lora_weights, plain.lora_ga_config = True, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, plain)
    layers = [m for m in wrapped.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for position, layer in enumerate(layers):
        torch.manual_seed(seed + position)
        layer.lora_ga_init("default", config.lora_ga_config)
    return wrapped


@pytest.mark.parametrize(("direction", "scale"), [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("A2rBr", "gd_scale")])
def test_lora_ga_trains_as_peft_does(direction, scale, tmp_path):
    data = batches(3, seed=7)
    ga = peft.LoraGAConfig(direction=direction, scale=scale)
    config = lora_config(init_lora_weights="lora_ga", lora_ga_config=ga)
    options = {**OPTIONS, "direction": direction, "scale": scale}
    report = train_side_by_side(
        tiny_llama, "lora_ga", options, config, export_dir=tmp_path / "peft", calibration=losses(data),
        make_theirs=lambda model: peft_loraga(model, data, config),
    )  # fmt: skip
    check(report)


def test_lora_ga_gradient_estimate_equals_peft():
    data = batches(3, seed=7)
    model = tiny_llama()
    theirs = copy.deepcopy(model)
    config = lora_config(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())
    peft.tuners.lora.preprocess_loraga(
        theirs, config, train_step=lambda: [task_loss(theirs, b)[0].backward() for b in data]
    )
    expected = {n: m._peft_loraga_grad for n, m in theirs.named_modules() if hasattr(m, "_peft_loraga_grad")}
    from vpeft.core import select_targets
    from vpeft.methods.lora_ga import LoRAGA

    cfg = LoRAGAConfig(targets=tuple(TARGETS), head=())
    ours = estimate_gradients(model, select_targets(model, cfg, LoRAGA, "lora_ga"), losses(data), cfg)
    assert sorted(ours) == sorted(expected) and len(ours) == 6
    for name, grad in ours.items():
        assert grad.abs().max() > 1e-4  # a real gradient
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6)


def test_residual_methods_leave_the_base_weights_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vpeft.apply_method(model, "lora_ga", calibration=losses(batches(2)), **OPTIONS)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not layer.A0.requires_grad and layer.A0.abs().sum() > 0 for layer in layers_of(model, "default"))
