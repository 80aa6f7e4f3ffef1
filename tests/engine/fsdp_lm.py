"""Run under torchrun by tests/engine/test_fsdp_lm.py: ``python fsdp_lm.py CONFIG RUN_DIR SET...``.

First each process builds the causal-LM run of CONFIG (``--set`` overrides SET) as the engine does, LoRA applied,
shards it with the engine's FSDP and greedily answers one test prompt of its own (the process's rank) with its own
end tokens: rank 0 stops after the first new token, the others run to ``max_new_tokens``. Each forward pass of a
sharded model is a collective, so the processes must decode in step (``synced_gpus``) or the longer ones wait forever.
Then it trains CONFIG into RUN_DIR as ``fsdp_resume.py`` does (killed after the first epoch, resumed in the same
processes), and rank 0 writes ``RUN_DIR/generated.json``: per rank the sharded model's reply and an unsharded copy's
with the same end tokens. The process group is made once, here: torch cannot
make it again in processes torchrun started (``fsdp_resume.py``'s interrupted run leaves it to the resumed one).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch.distributed as torch_dist

import vpeft
from tests.engine import fsdp_resume
from vpeft.engine import cli, distributed
from vpeft.engine.config import load_config
from vpeft.engine.train import build_run


def generate_in_step(config: str, sets: list[str], dist: distributed.Dist) -> dict:
    task, model, datasets = build_run(load_config(config, sets))
    vpeft.apply_method(model, "lora", r=4, dropout=0.0)
    model.eval()
    batch = task.collate([datasets["test"][dist.rank]])
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    never = model.config.vocab_size  # an id past the vocabulary: no end token
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=task.max_new_tokens, do_sample=False,
                          eos_token_id=[never], pad_token_id=task.tokenizer.pad_token_id)  # fmt: skip
    ends = [int(free[0, ids.shape[1]])] if dist.rank == 0 else [never]  # rank 0: its first new token ends it
    alone = task.generate(copy.deepcopy(model), ids, mask, ends)[0]
    dist.wrap(model)  # sharded in place
    sharded = task.generate(model, ids, mask, ends)[0]
    return {"sharded": sharded, "alone": alone}


def main(argv: list[str]) -> int:
    config, run_dir, *sets = argv
    dist = distributed.setup("cpu", "fsdp")
    mine = generate_in_step(config, sets, dist)
    replies = [None] * dist.world
    torch_dist.all_gather_object(replies, mine)
    fsdp_resume.main(argv)  # closes the process group at the end
    if dist.main:
        (Path(run_dir) / "generated.json").write_text(json.dumps(replies))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
