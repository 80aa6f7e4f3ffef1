"""The HF PEFT equivalence harness: one method built in vpeft and in ``peft`` on the same model must train alike.

    report = train_side_by_side(tiny_llama, "dora", {"dropout": 0.0}, peft.LoraConfig(r=8, use_dora=True, ...))

1. The same base model is copied twice; vpeft applies its method to one, ``peft.get_peft_model`` to the other.
2. vpeft's initial trainable values are copied into the peft model (``PEFT_NAMES`` maps vpeft's logical keys, the
   keys of its adapter files, to peft's parameter names), so both start from one point whatever each library's init.
   Frozen adapter tensors (VeRA's shared random projections) are not copied: each library makes its own, and the
   logits agree only if they are the same.
3. Both take the same AdamW steps on the same batches; the logits of every step and the trained tensors must agree.
4. vpeft's trained adapter, exported with ``vpeft.export_hf_peft``, loads in ``peft`` and gives the same logits.

IA3 and VeRA reuse it with their own mapping entries (tests/lm/test_vector_methods_peft.py). A method with a
regulariser (KaSA) passes ``their_loss``: then each side trains on its task loss plus its own regulariser (vpeft's
``method_loss``, PEFT's function of its model), and the two regularisers' values are compared at every step.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import adapter_tensors

from .models import batches, task_loss

peft = pytest.importorskip("peft")

# vpeft logical key (target path, part, tensor) -> peft parameter name under ``base_model.model``
PEFT_NAMES: list[tuple[str, str]] = [
    (r"^(?P<path>.+)\.all\.lora_A$", r"\g<path>.lora_A.default.weight"),
    (r"^(?P<path>.+)\.all\.lora_B$", r"\g<path>.lora_B.default.weight"),
    (r"^(?P<path>.+)\.all\.magnitude$", r"\g<path>.lora_magnitude_vector.default.weight"),
    (r"^(?P<path>.+)\.all\.ia3_l$", r"\g<path>.ia3_l.default"),  # vpeft (n,), peft (out, 1) or (1, in)
    (r"^(?P<path>.+)\.all\.vera_lambda_(?P<v>[bd])$", r"\g<path>.vera_lambda_\g<v>.default"),
    (r"^(?P<path>.+)\.all\.lora_diag$", r"\g<path>.lora_diag.default"),  # KaSA's singular values
    (r"^(?P<head>.+)\.(?P<tensor>weight|bias)$", r"\g<head>.modules_to_save.default.\g<tensor>"),  # a head copy
]


def peft_name(key: str) -> str:
    for pattern, replacement in PEFT_NAMES:
        if re.match(pattern, key):
            return "base_model.model." + re.sub(pattern, replacement, key)
    raise KeyError(f"no peft name for vpeft key {key!r}: add a PEFT_NAMES entry")


@dataclass
class SideBySide:
    logit_diffs: list[float] = field(default_factory=list)  # max |vpeft - peft| after each step, and before any
    tensor_diff: float = 0.0  # max over the trained adapter tensors
    tensor_scale: float = 0.0  # the largest entry of those tensors (CorDA's A is large: C^-1 in it)
    export_diff: float = 0.0  # vpeft's exported adapter loaded in peft, against the vpeft model
    moved: float = 0.0  # how far training moved the logits (so that agreement is not agreement at rest)
    loss_diffs: list[float] = field(default_factory=list)  # |vpeft's method loss - their_loss| at each step


def train_side_by_side(
    make_model: Callable[[], nn.Module],
    method: str,
    options: dict,
    peft_config,
    steps: int = 5,
    lr: float = 1e-2,
    export_dir: Path | None = None,
    calibration: list | None = None,
    make_theirs: Callable[[nn.Module], nn.Module] | None = None,
    their_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> SideBySide:
    """``calibration`` goes to vpeft's apply; ``make_theirs(base copy)``, when given, builds the peft model in place
    of ``peft.get_peft_model(base copy, peft_config)`` (CorDA and LoRA-GA run PEFT's preprocessing first)."""
    base = make_model()
    ours = copy.deepcopy(base)
    vpeft.apply_method(ours, method, calibration=calibration, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = (make_theirs or (lambda m: peft.get_peft_model(m, peft_config)))(copy.deepcopy(base))
    ours_tensors = {k: v for k, v in adapter_tensors(ours, "default").items() if v.requires_grad}
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in ours_tensors.items():
            their = their_params[peft_name(key)]
            their.copy_(value.reshape(their.shape))
    trained = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trained == {peft_name(k) for k in ours_tensors}, "the two libraries train different tensors"

    data = batches(steps + 1)
    report = SideBySide()
    start = task_loss(ours, data[-1])[1].detach()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr) for m in (ours, theirs)]
    for step in range(steps + 1):
        outputs = []
        extras = []
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            loss, logits = task_loss(model, data[step])
            outputs.append(logits.detach())
            if their_loss is not None:
                extras.append(vpeft.method_loss(model) if model is ours else their_loss(model))
                loss = loss + extras[-1]
            if step < steps:  # the last batch is only evaluated
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        report.logit_diffs.append((outputs[0] - outputs[1]).abs().max().item())
        if extras:
            report.loss_diffs.append((extras[0] - extras[1]).abs().item())
    report.moved = (outputs[0] - start).abs().max().item()
    their_params = dict(theirs.named_parameters())
    report.tensor_diff = max(
        (v - their_params[peft_name(k)].reshape(v.shape)).abs().max().item() for k, v in ours_tensors.items()
    )
    report.tensor_scale = max(v.abs().max().item() for v in ours_tensors.values())
    if export_dir is not None:
        vpeft.export_hf_peft(ours, export_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(export_dir))
        with torch.no_grad():
            probe = data[0]
            report.export_diff = (task_loss(loaded, probe)[1] - task_loss(ours, probe)[1]).abs().max().item()
    return report
