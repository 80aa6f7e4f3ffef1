"""Peak memory of the calibration pass (CorDA's input covariances, LoRA-GA's weight gradients) against one LoRA step.

    python V-PEFT-Bench/perf/calibration_memory.py
    python V-PEFT-Bench/perf/calibration_memory.py --runs lora,corda --items 8 --out /tmp/table.md

Issue 17 asks that the calibration service never costs more memory than training does. Each row runs in a child
process of its own on SmolLM2-135M-Instruct (``vpeft.backbones.causal_lm``) with speed.py's ``smollm2`` workload:
batches of 4 x 256 random tokens with next-token loss.

* ``lora``: LoRA r=8 on q and v, AdamW, one optimizer step (forward, backward, step): the reference.
* ``corda`` / ``lora_ga`` / ``pissa``: ``vpeft.apply_method`` with the method's default targets and ``--items``
  calibration batches (dicts of model inputs with labels), i.e. the whole ``prepare``: the calibration statistics
  (CorDA: forward hooks into float64 covariance accumulators, no gradient; LoRA-GA: a backward per batch whose
  gradients are folded into running totals as autograd produces them), then the per-target decompositions and the
  adapter's construction. PiSSA (an SVD per target, no data) separates the decompositions' share.

The statistics are streaming (one accumulator per target, whatever the number of batches), so the peak does not
grow with ``--items``; the default 4 keeps the run to minutes on a CPU (CorDA's paper uses 256 samples, LoRA-GA's
64). Peak: on a GPU ``max_memory_allocated``; on the CPU the child's peak resident set size with glibc's mmap
threshold fixed (speed.py's docstring says why).
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
from vpeft.errors import ConfigError

BATCH, LENGTH, VOCAB = 4, 256, 49152
RUNS = ("lora", "pissa", "corda", "lora_ga")


def batch(seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def child(name: str, items: int) -> None:
    from vpeft.backbones.causal_lm import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = load_causal_lm("smollm2", load_tokenizer=False)[0].to(device)
    tic = time.perf_counter()
    if name == "lora":
        model.train()
        vpeft.apply_method(model, "lora", r=8, targets=["q", "v"])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model(**batch(1, device)).loss.backward()
        optimizer.step()
    else:
        calibration = [batch(100 + i, device) for i in range(items)]
        options = {"calibration_batches": items} if name != "pissa" else {}
        vpeft.apply_method(model, name, calibration=calibration if name != "pissa" else None, **options)
    seconds = time.perf_counter() - tic
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    print(json.dumps({"peak_mb": peak, "seconds": seconds, "trainable": trainable}))


def measure(name: str, items: int) -> dict:
    return child_json(__file__, ["--child", name, "--items", str(items)], name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--items", type=cli.at_least(1), default=4, help="calibration batches (streaming: any count)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.items)
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise ConfigError(f"--runs: {', '.join(unknown)} unknown; choose from {', '.join(RUNS)}.")
    title, command = heading("Calibration memory", "calibration_memory.py", argv)
    lines = [
        title,
        "",
        f"`{command}`; SmolLM2-135M-Instruct, batches of {BATCH} x {LENGTH} tokens; `lora` is one training step "
        f"(r=8 on q, v, AdamW), the others the whole `apply_method` with {args.items} calibration batches. Peak: "
        + peak_source(),
        "",
        "| run | trainable | peak MB | x lora step | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows: dict[str, dict] = {}

    def row(name: str) -> str:
        rows[name] = r = measure(name, args.items)
        base = rows.get("lora", {"peak_mb": float("nan")})
        return (
            f"| {name} | {r['trainable']:,} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.3f} | "
            f"{r['seconds']:.1f} |"
        )

    stream_table(lines, names, row, args.out)


if __name__ == "__main__":
    sys.exit(cli.run(main))
