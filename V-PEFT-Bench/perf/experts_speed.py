"""Training-step time of the mixtures of LoRA experts (mola, dynmole) against LoRA on the same targets.

    python V-PEFT-Bench/perf/experts_speed.py

A random Llama (hidden 256, MLP 688, 4 blocks, grouped k/v; no download), batch 4 x 128 tokens, next-token loss plus
the method's own loss, AdamW; one thread, process CPU time (other load on a shared machine barely moves it), median of
5 rounds of 3 steps, every round visiting every variant once after one warm-up step each. MoLA (2/4/6/8 experts of
rank 8 over the 4 blocks, top-2, on q, k, v, o, up, down) is compared with LoRA r=8 on the same six roles, DynMoLE
(6 experts of rank 24 on up and down) with LoRA r=24 on those two; dropout 0.05 in all.
"""

import copy
import statistics
import sys
import time

import torch
import transformers

import vpeft
from vpeft.engine import cli

ALL6 = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
MLP = ("mlp_in", "mlp_out")
VARIANTS = {  # name -> (method, options, the variant its time is compared with)
    "lora 6 roles r8": ("lora", {"targets": ALL6, "dropout": 0.05}, None),
    "mola (defaults, balance 0.001)": ("mola", {"balance": 0.001}, "lora 6 roles r8"),
    "lora mlp_in,mlp_out r24": ("lora", {"targets": MLP, "r": 24, "dropout": 0.05}, None),
    "dynmole (defaults)": ("dynmole", {}, "lora mlp_in,mlp_out r24"),
}


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    extra = vpeft.method_loss(model)  # the routers' statistics of this pass
    (loss if extra is None else loss + extra).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, (method, options, _) in VARIANTS.items():
        model = copy.deepcopy(base)
        params = vpeft.apply_method(model, method, **options).trainable
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model.train(), opt, params)
        step(model, opt, ids)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, (model, opt, _) in runs.items():
            start = time.process_time()
            for _ in range(3):
                step(model, opt, ids)
            times[name].append((time.process_time() - start) / 3)
    for name, (_, _, params) in runs.items():
        med, ref = statistics.median(times[name]), VARIANTS[name][2]
        versus = f"x{med / statistics.median(times[ref]):.2f} of {ref}" if ref else ""
        spread = f"{min(times[name]) * 1000:.1f}-{max(times[name]) * 1000:.1f}"
        print(f"{name:32s} params {params:>9,d}  step {med * 1000:7.1f} ms  ({spread})  {versus}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
