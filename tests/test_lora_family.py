"""Hugging Face PEFT export recognises the LoRA family by what a method class declares (``lora_variant``), not by its
registry name: a new LoRA variant registered under a new name exports without an edit to vpeft.interop."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import vpeft
from vpeft.methods import METHODS
from vpeft.methods.lora import LoRA

from .conftest import tiny_vit

peft = pytest.importorskip("peft")


class OrthogonalInitLoRA(LoRA):
    """A LoRA variant that differs only in how A starts (orthogonal rows): the same update, so the same export."""

    def __init__(self, target, config, shared=None):
        super().__init__(target, config, shared)
        with torch.no_grad():
            nn.init.orthogonal_(self.lora_A)


class GatedLoRA(LoRA):
    """A variant whose math differs from LoRA's (a tanh gate on the update): it declares no PEFT counterpart."""

    lora_variant = None

    def adapt_output(self, x, y):
        return y + math.tanh(1.0) * (super().adapt_output(x, y) - y)


@torch.no_grad()
def test_a_new_lora_variant_exports_by_its_class(images, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "orthogonal_lora", OrthogonalInitLoRA)
    base = tiny_vit()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "orthogonal_lora")
    for module in vpeft.core.layers_of(model, "default"):
        module.lora_B.normal_(0.0, 0.05)  # away from B = 0, where every LoRA is the identity
    model.eval()
    vpeft.export_hf_peft(model, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf")).eval()
    assert (hf(images) - model(images)).abs().max().item() <= 1e-5
    assert (model(images) - base(images)).abs().max().item() > 1e-3


def test_a_variant_with_other_math_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "gated_lora", GatedLoRA)
    model = tiny_vit()
    vpeft.apply_method(model, "gated_lora")
    with pytest.raises(
        ValueError, match=r"only the LoRA family \(lora, dora[^)]*\), ia3, vera and kasa have PEFT counterparts"
    ):
        vpeft.export_hf_peft(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
