"""Peak memory of full fine-tuning of SmolLM2-135M with each optimiser: AdamW against GaLore and its variants.

    python V-PEFT-Bench/perf/optim_memory.py
    python V-PEFT-Bench/perf/optim_memory.py --optimizers adamw,galore --rank 128 --out /tmp/table.md

Each optimiser runs in a child process of its own: SmolLM2-135M-Instruct (``vpeft.backbones.causal_lm``), the method
``full`` (every tensor trains), the optimiser built by ``vpeft.build_optimizer`` (GaLore's family projects the weight
matrices of the 30 decoder blocks, the default ``targets``; the tied embedding and the norms take the plain Adam
step), batch 4 of 256 random tokens with next-token loss (speed.py's ``smollm2`` workload), three steps, the first
of which computes the projection bases. Two numbers per optimiser: the optimiser state (the bytes of every tensor in
``optimizer.state``, exact and independent of the machine) and the peak memory of the child: on a GPU
``max_memory_allocated``; on the CPU the peak resident set size, with glibc's mmap threshold fixed so that every
tensor of 128 KiB or more is returned to the system when freed (speed.py's docstring says why: repeatable to 1 MB).
The peak holds the weights, their gradients, the activations of one step and the optimiser state, so the saving in
state shows in it one for one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from memory_child import child_json, heading, peak_source, rss_mb, stream_table

import vpeft
from vpeft.engine import cli
from vpeft.optim import optimizer_options

BATCH, LENGTH, STEPS = 4, 256, 3
OPTIMIZERS = ("adamw", "galore", "natural_galore", "gradnorm_lorp")


def child(name: str, rank: int) -> None:
    from vpeft.backbones.causal_lm import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = load_causal_lm("smollm2", load_tokenizer=False)[0].to(device).train()
    vpeft.apply_method(model, "full")
    options = {} if name == "adamw" else {"rank": rank}
    optimizer = vpeft.build_optimizer(model, name, lr=1e-5, weight_decay=0.0, **options)
    ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1)).to(device)
    tic = time.perf_counter()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - tic
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    projected = sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    print(json.dumps({"peak_mb": peak, "state_mb": state / 2**20, "projected": projected, "seconds": seconds}))


def measure(name: str, rank: int) -> dict:
    return child_json(__file__, ["--child", name, "--rank", str(rank)], name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optim.name values")
    parser.add_argument("--rank", type=cli.at_least(1), default=128, help="the projection rank (GaLore's 128)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rank)
        return
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for name in names:  # a wrong name stops before the first child (minutes) starts
        optimizer_options(name, {} if name == "adamw" else {"rank": args.rank})
    title, command = heading("Optimiser memory", "optim_memory.py", argv)
    lines = [
        title,
        "",
        f"`{command}`; SmolLM2-135M-Instruct, method `full`, batch {BATCH} x {LENGTH} tokens, {STEPS} steps, "
        f"rank {args.rank} for the projecting optimisers. Peak: " + peak_source(),
        "",
        "| optim.name | projected matrices | optimiser state MB | x adamw | peak MB | x adamw | seconds (3 steps) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: dict[str, dict] = {}

    def row(name: str) -> str:
        rows[name] = r = measure(name, args.rank)
        base = rows.get("adamw", {"state_mb": float("nan"), "peak_mb": float("nan")})
        return (
            f"| {name} | {r['projected']} | {r['state_mb']:.0f} | {r['state_mb'] / base['state_mb']:.3f} | "
            f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.3f} | {r['seconds']:.1f} |"
        )

    stream_table(lines, names, row, args.out)


if __name__ == "__main__":
    sys.exit(cli.run(main))
