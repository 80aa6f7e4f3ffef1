"""SORSA and SVFit export to Hugging Face PEFT as exact LoRAs (SORSA at rank 2r with the frozen start folded in,
SVFit at its largest rank with zero padding), load in ``peft`` with the same logits, and read back into vpeft as a
LoRA that computes the same model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vpeft
from vpeft.core import adapter_record
from vpeft.errors import ConfigError

from ..conftest import perturb
from .equivalence import peft
from .models import TINY_LMS, batches, task_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("sorsa", "llama", {"r": 4}), ("sorsa", "gpt2", {"r": 4, "alpha": 8.0}), ("svfit", "gpt2", {"r": 3}),
         ("svfit", "llama", {})]  # fmt: skip


@pytest.mark.parametrize(("method", "lm", "options"), CASES)
def test_exports_as_an_exact_lora(method, lm, options, tmp_path):
    base = TINY_LMS[lm]()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method, **options)
    perturb(model)
    batch = batches(1, seed=4)[0]
    with torch.no_grad():
        expected = task_loss(model, batch)[1]
        assert (expected - task_loss(base, batch)[1]).abs().max() > 1e-3  # a real update to carry
    vpeft.export_hf_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(task_loss(loaded, batch)[1], expected, rtol=0, atol=1e-5)
    back = copy.deepcopy(base)
    ranks = dict(getattr(adapter_record(model, "default").config, "ranks", ()))  # SVFit's per-target ranks
    if len(set(ranks.values())) > 1:
        with pytest.raises(ConfigError, match="cannot import the adapter"):  # one vpeft LoRA config has one rank
            vpeft.import_hf_peft(back, tmp_path / "peft")
        return
    vpeft.import_hf_peft(back, tmp_path / "peft")
    assert adapter_record(back, "default").method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(task_loss(back, batch)[1], expected, rtol=0, atol=1e-5)
