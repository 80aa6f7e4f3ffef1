"""FFA-LoRA: A never changes in training, and averaging client adapters is exact: the update of the averaged adapter
is the mean of the clients' updates (LoRA, whose A trains too, is not); it exports to HF PEFT as a LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

import vpeft
from vpeft.core import adapter_record, adapter_tensors, layers_of, load_adapter_tensors

from ..lm.models import batches, task_loss, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vit_b16_count(vit_b16):
    report = vpeft.apply_method(copy.deepcopy(vit_b16), "ffa_lora")
    assert report.trainable == 12 * 2 * 8 * 768 == 147_456  # B only: half of LoRA's 294,912


def client(base: torch.nn.Module, seed: int, steps: int = 3) -> torch.nn.Module:
    """A client's copy of the broadcast model, trained with AdamW on its own batches."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for batch in batches(steps, seed=seed):
        opt.zero_grad()
        task_loss(model, batch)[0].backward()
        opt.step()
    return model


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every adapted weight's update ``s B A`` (per target key)."""
    keys = adapter_record(model, "default").targets
    return {key: layer.delta_weight() for key, layer in zip(keys, layers_of(model, "default"), strict=True)}


def averaged(server: torch.nn.Module, clients: list[torch.nn.Module]) -> torch.nn.Module:
    """FedAvg of the adapters' tensors, loaded into a copy of the broadcast model (what the server sends back)."""
    tensors = [adapter_tensors(c, "default") for c in clients]
    mean = {k: torch.stack([t[k].detach() for t in tensors]).mean(0) for k in tensors[0]}
    model = copy.deepcopy(server)
    load_adapter_tensors(model, "default", mean, "the averaged clients")
    return model


@pytest.mark.parametrize("method", ["ffa_lora", "lora"])
def test_the_averaged_adapter_s_update_is_the_mean_client_update_for_ffa_lora_only(method):
    server = tiny_llama()
    vpeft.apply_method(server, method, dropout=0.0, head=())
    server.train()
    clients = [client(server, seed) for seed in (1, 2, 3)]
    mean_update = {k: torch.stack([deltas(c)[k] for c in clients]).mean(0) for k in deltas(server)}
    update_of_mean = deltas(averaged(server, clients))
    gap = max((mean_update[k] - update_of_mean[k]).abs().max().item() for k in mean_update)
    size = max(v.abs().max().item() for v in mean_update.values())
    assert size > 1e-3  # the clients moved
    if method == "ffa_lora":
        assert gap <= 1e-7
        for c in clients:  # A is the broadcast A0, bit for bit
            for ours, theirs in zip(layers_of(c, "default"), layers_of(server, "default"), strict=True):
                assert torch.equal(ours.lora_A, theirs.lora_A) and "lora_A" not in dict(ours.named_parameters())
    else:
        assert gap > 1e-2 * size  # the cross terms of B_k A_k


def test_exports_as_a_lora_that_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "ffa_lora", dropout=0.0, head=())
    model = client(model, seed=4)
    vpeft.export_hf_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    batch = batches(1, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(task_loss(loaded, batch)[1], task_loss(model, batch)[1], rtol=0, atol=1e-5)
