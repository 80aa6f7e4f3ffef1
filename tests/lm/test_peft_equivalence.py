"""LoRA and DoRA equal HF PEFT on BERT, GPT-2 (fused Conv1D) and Llama (GQA): same start, 5 AdamW steps, same logits."""

from __future__ import annotations

import pytest

from .equivalence import peft, train_side_by_side
from .models import TINY_LMS

# vpeft options and the peft LoraConfig of the same adapter on each model (dropout off: masks would differ)
TARGETS = {
    "bert": (["query", "value"], ["query", "value"], "SEQ_CLS"),
    "gpt2": (["c_attn"], ["c_attn"], "CAUSAL_LM"),
    "llama": (["q_proj", "v_proj"], ["q_proj", "v_proj"], "CAUSAL_LM"),
}


@pytest.mark.parametrize("model", sorted(TINY_LMS))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_vpeft_trains_as_peft_does(method, model, tmp_path):
    ours, theirs, task = TARGETS[model]
    head = None if model == "bert" else ()
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=theirs, use_dora=method == "dora", task_type=task,
        fan_in_fan_out=model == "gpt2",
    )  # fmt: skip
    options = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ours, "head": head}
    report = train_side_by_side(TINY_LMS[model], method, options, config, export_dir=tmp_path / "peft")
    assert report.moved > 1e3 * 1e-5, "training barely moved the logits: agreement within 1e-5 would prove nothing"
    assert max(report.logit_diffs) <= 1e-5, report.logit_diffs
    assert report.tensor_diff <= 1e-5
    assert report.export_diff <= 1e-5
