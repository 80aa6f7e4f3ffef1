"""KaSA equals HF PEFT's KaSA (``LoraConfig(kasa_config=...)``) on the tiny Llama: the truncated start, 5 AdamW steps
on the task loss plus each library's KaSA regulariser, and the regulariser's value."""

from __future__ import annotations

import warnings

import pytest
import torch

import vpeft
from vpeft.errors import ConfigError

from .equivalence import peft, train_side_by_side
from .models import batches, task_loss, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def their_kasa_loss(model):
    return model.base_model._get_kasa_loss()


def test_kasa_trains_as_peft_does_with_its_regulariser(tmp_path):
    """Same start (vpeft's A, B, d copied into PEFT), both truncate W's 8 smallest components, 5 AdamW steps on the
    task loss plus each library's KaSA loss: logits within 1e-5 at every step, the losses within 1e-6; the trained
    adapter exported to PEFT (which truncates the base weight again when it loads) gives the same logits."""
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        kasa_config=peft.tuners.lora.KasaConfig(beta=1e-2, gamma=1e-2),
    )  # fmt: skip
    options = {"head": (), "beta": 1e-2, "gamma": 1e-2}  # larger than the defaults, so that the terms train
    report = train_side_by_side(
        tiny_llama, "kasa", options, config, their_loss=their_kasa_loss, export_dir=tmp_path / "peft"
    )
    assert report.moved > 1e3 * 1e-5, "training barely moved the logits: agreement within 1e-5 would prove nothing"
    assert max(report.logit_diffs) <= 1e-5, report.logit_diffs
    assert report.tensor_diff <= 1e-5
    assert max(report.loss_diffs) <= 1e-6, report.loss_diffs
    assert len(report.loss_diffs) == 6
    assert report.export_diff <= 1e-5


def test_kasa_truncation_equals_peft_s_at_init():
    ours = tiny_llama()
    vpeft.apply_method(ours, "kasa", head=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 kasa_config=peft.tuners.lora.KasaConfig())  # fmt: skip
        theirs = peft.get_peft_model(tiny_llama(), config)
    batch = batches(1)[0]
    with torch.no_grad():
        diff = (task_loss(ours, batch)[1] - task_loss(theirs, batch)[1]).abs().max().item()
        moved = (task_loss(ours, batch)[1] - task_loss(tiny_llama(), batch)[1]).abs().max().item()
    assert diff <= 1e-5 and moved > 1e2 * diff, (diff, moved)


def test_kasa_on_fused_slices_is_refused_by_export_and_nothing_is_written(tmp_path):
    model = tiny_gpt2()
    vpeft.apply_method(model, "kasa", head=())  # roles q, v: slices of c_attn, each truncated on its own
    with pytest.raises(
        ConfigError, match=r"cannot export KaSA on slices \['q', 'v'\] of 'transformer.h.0.attn.c_attn'"
    ):
        vpeft.export_hf_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
