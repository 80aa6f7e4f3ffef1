"""Peak memory of a training step with a quantised base (PEQA, L4Q, SketchTune, HALO) against LoRA on the
dequantised (full-precision) SmolLM2-135M.

    python V-PEFT-Bench/perf/quant_memory.py                       # CPU here, or the GPU when there is one
    python V-PEFT-Bench/perf/quant_memory.py --methods lora,peqa --out V-PEFT-Bench/perf/results/cpu-quant-memory.md

Every variant adapts the same 210 weights, the quantised-base methods' default targets (role ``in_block``: every
Linear of the 30 decoder blocks, q/k/v/o and gate/up/down), and trains with AdamW on ``--batch`` sequences of
``--length`` random tokens with next-token loss for three steps. ``lora``: vpeft's LoRA r = 8 on those targets, on
the full-precision model (SmolLM2 as vpeft loads it, dequantised once from its GGUF file); ``peqa`` and
``sketchtune``: 4-bit codes, packed, the full-precision weights of the targets freed; ``l4q`` (r = 8, 4 bits) and
``halo`` (r = 8, INT8 emulated) keep them.

Each variant runs in a fresh child process. Four numbers: the bytes of the frozen target weights as the model
holds them (fp32 weights, or packed codes plus zero points; exact, machine-independent), the bytes of every tensor
the model holds (parameters and buffers), the memory held just before the steps (``memory_allocated``, or the
resident set size: the model and the process's libraries), and the peak memory of the three training steps: on CUDA
``max_memory_allocated`` after ``reset_peak_memory_stats``; on the CPU the peak resident set size (``VmHWM``,
reset through ``/proc/self/clear_refs`` once the model is built, so loading the full-precision checkpoint is not in
it) with glibc's mmap threshold fixed at 128 KiB, so that every tensor of that size or more goes back to the system
when freed (speed.py's docstring says why). On the CPU the loaded weights are first copied out of the checkpoint's
file mapping: transformers maps the safetensors file, and a method that frees the full-precision weights after
reading them (PEQA, SketchTune) would otherwise leave their pages resident in that mapping (measured: file-backed
resident memory 353 MB after loading, 758 MB after PEQA's quantisation read every weight), which the kernel can
reclaim but the resident set size counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from memory_child import child_json, heading, rss_mb, stream_table

import vpeft
from vpeft.core import WHOLE, adapted_modules
from vpeft.engine import cli
from vpeft.errors import ConfigError

METHODS = ("lora", "peqa", "sketchtune", "l4q", "halo")
OPTIONS = {"lora": {"targets": ("in_block",), "r": 8, "alpha": 16.0, "dropout": 0.0}}


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def child(method: str, batch: int, length: int) -> None:
    from vpeft.backbones.causal_lm import load_causal_lm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = load_causal_lm("smollm2", load_tokenizer=False)[0].to(device).train()
    if device.type == "cpu":  # the loader maps the checkpoint file: a freed weight's pages would stay in the mapping
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    vpeft.apply_method(model, method, **OPTIONS.get(method, {}))
    frozen = 0
    for adapted in adapted_modules(model, "default"):
        layer = adapted.parts[WHOLE]
        if layer.releases_base:  # the packed codes, and PEQA's zero points
            frozen += layer.packed_bytes() + tensor_bytes([layer.zero] if hasattr(layer, "zero") else [])
        else:
            frozen += tensor_bytes([adapted.base.weight])
    held = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, 49152, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:  # a kernel or container that refuses: the peak then includes building the model
            print("quant_memory: /proc/self/clear_refs refused; the peak includes loading", file=sys.stderr)
    resident = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb("VmRSS")
    tic = time.perf_counter()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"frozen_mb": frozen / 2**20, "held_mb": held / 2**20, "resident_mb": resident, "peak_mb": peak,
                      "seconds": seconds, "trainable": trainable}))  # fmt: skip


def measure(method: str, batch: int, length: int) -> dict:
    return child_json(__file__, ["--child", method, "--batch", str(batch), "--length", str(length)], method)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--batch", type=cli.at_least(1), default=2)
    parser.add_argument("--length", type=cli.at_least(2), default=128)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.batch, args.length)
        return
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ConfigError(f"--methods names {unknown}; this table compares {', '.join(METHODS)}.")
    title, command = heading("Training-step memory with a quantised base", "quant_memory.py", argv)
    lines = [
        title,
        "",
        f"`{command}`; SmolLM2-135M-Instruct, every Linear of the 30 blocks adapted (210 weights), AdamW, batch "
        f"{args.batch} x {args.length} tokens, 3 steps. Peak: "
        + (
            "`max_memory_allocated` of the steps."
            if torch.cuda.is_available()
            else "peak RSS of the steps in a child (reset after building the model; fixed mmap threshold)."
        ),
        "",
        "| method | trainable | frozen target weights MB | model tensors MB | before the steps MB | peak MB | x lora | "
        "peak - before MB | seconds (3 steps) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: dict[str, dict] = {}

    def row(name: str) -> str:
        rows[name] = r = measure(name, args.batch, args.length)
        ref = rows.get("lora", {"peak_mb": float("nan")})["peak_mb"]
        return (
            f"| {name} | {r['trainable']:,} | {r['frozen_mb']:.1f} | {r['held_mb']:.1f} | {r['resident_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['peak_mb'] / ref:.3f} | {r['peak_mb'] - r['resident_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )

    stream_table(lines, names, row, args.out)


if __name__ == "__main__":
    sys.exit(cli.run(main))
