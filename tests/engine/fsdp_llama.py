"""LoRA on the tiny Llama of tests/lm/models.py, sharded by the engine's FSDP (``Dist.wrap`` with ``parallel="fsdp"``)
over the processes torchrun starts; ``python fsdp_llama.py OUT_DIR`` under torchrun.

Every step each process takes its share of one global batch; FSDP averages the gradients, so the step equals one
process stepping on the mean of the shares' losses, which :func:`train` computes when it runs alone. Rank 0 writes
``OUT_DIR/losses.json`` (the per-step losses and the FSDP units made) and ``OUT_DIR/adapter.safetensors`` (the
gathered LoRA tensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

import vpeft
from tests.lm.models import batches, task_loss, tiny_llama
from vpeft.core import active_adapter, adapter_tensors
from vpeft.engine import cli, distributed
from vpeft.engine.optim import build_optimizer

STEPS = 4
BATCH = 4  # global: two sequences a process under two processes


def train(dist: distributed.Dist) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """(per-step mean loss, the whole LoRA tensors, FSDP units) after ``STEPS`` AdamW steps."""
    model = tiny_llama().train()
    vpeft.apply_method(model, "lora", r=4, dropout=0.0)
    dist.wrap(model)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999))
    losses = []
    for batch in batches(STEPS, seed=1, batch=BATCH):
        shares = [{k: v[i : i + BATCH // 2] for k, v in batch.items()} for i in range(0, BATCH, BATCH // 2)]
        mine = shares[dist.rank :: dist.world]
        loss = sum(task_loss(model, share)[0] for share in mine) / len(mine)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(dist.sum(loss.detach().reshape(1)).item() / dist.world)
    with dist.full_tensors(model):
        tensors = {k: v.detach().clone() for k, v in adapter_tensors(model, active_adapter(model)).items()}
    return losses, tensors, units


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    dist = distributed.setup("cpu", "fsdp")
    losses, tensors, units = train(dist)
    if dist.main:
        save_file(tensors, str(out / "adapter.safetensors"))
        (out / "losses.json").write_text(json.dumps({"losses": losses, "units": units}))
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
