"""Training-step time, peak memory and inference time of every method, side by side with Hugging Face PEFT's LoRA.

    python V-PEFT-Bench/perf/speed.py                       # CPU here, or the GPU when there is one
    python V-PEFT-Bench/perf/speed.py --grad-ckpt           # the same with gradient checkpointing
    python V-PEFT-Bench/perf/speed.py --methods lora,bitfit --reps 3 --out /tmp/table.md
    python V-PEFT-Bench/perf/speed.py --model smollm2       # the causal LM: SmolLM2-135M, LoRA r=8 on q and v

Two workloads (``--model``). ``vit_b16``: timm ``vit_base_patch16_224`` (random weights: speed does not depend on
them), batch 8 at 224x224. ``smollm2``: SmolLM2-135M-Instruct (``vpeft.backbones.causal_lm``), batch 4 of 256
random tokens, next-token loss; methods default to ``lora``. Both train with AdamW. Step and inference times are
medians over ``--reps`` rounds; every round visits every variant once (interleaved), so a slow spell of the machine
hits all of them alike. Peak memory: on a GPU ``max_memory_allocated`` per variant in this
process; on the CPU the peak resident set size of a child process per variant (a process's peak cannot be reset).
glibc's malloc raises its mmap threshold as large blocks are freed and then keeps freed tensors in its heap, which
moves a child's peak by +-50 MB from run to run; the child therefore runs with a fixed ``MALLOC_MMAP_THRESHOLD_``, so
every tensor of 128 KiB or more is mapped and unmapped with its life and the peak is that of the tensors alive at
once (as ``max_memory_allocated`` is on a GPU), repeatable to 1 MB. ``--default-allocator`` measures glibc as is.
Ratios are to full fine-tuning, to HF PEFT LoRA (r=8 on the fused qkv, as users would set it up), to the floor
below and, for inference, to the base model.

The ``frozen_backprop`` row is the floor for LoRA-like methods: the frozen model trained only in the biases of its
q/k/v projections (ViT: the qkv biases and the head; SmolLM2, which has no biases: zero biases added to q_proj and
v_proj). Its step runs the whole forward pass, and a backward pass that carries the gradient from the loss down to
the q and v outputs of every block (through the LM head, the MLPs, attention and the norms; not into the first
block's input, which no q,v method needs), plus the bias gradients (row sums) and AdamW over the biases. It computes
no weight gradient and none of an adapter's own work (for LoRA: the dropout mask, ``x' A^T``, ``h B^T``, the add and
their gradients), so no method that adapts q and v can step faster; ``x floor`` is what the adapter's own work costs.
With gradient checkpointing the floor recomputes every block's forward in the backward pass as the methods do, so it
stays a floor (a method's recompute also repeats its adapter work, the dropout draw included). Every round times the
unmerged adapted models' inference in eval mode and then puts them back in training mode: before that was done, the
adapted variants trained in eval mode from the second round on, without dropout and, on SmolLM2, without gradient
checkpointing (Hugging Face applies it in training mode only), which made them look faster than the floor.

Timing on a shared machine: ``--threads 1 --clock cpu`` times the process's CPU time on one thread, which other load
barely moves (it still shares caches and memory bandwidth); wall-clock ratios at the default threads need a quiet
machine. ``--methods lora:dropout=0.0`` adds a variant with other options, to time what one option costs.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vpeft
from vpeft.engine import cli
from vpeft.errors import ConfigError
from vpeft.files import atomic_write
from vpeft.methods import METHODS
from vpeft.registry import lookup

HF_LORA = "hf_peft_lora"
FLOOR = "frozen_backprop"
BATCH, SIZE, CLASSES = 8, 224, 100  # vit_b16
LM_BATCH, LM_LENGTH = 4, 256  # smollm2
MODEL = "vit_b16"  # the workload, set once by main() or the memory child from --model
WORKLOADS = {
    "vit_b16": f"vit_base_patch16_224, batch {BATCH}, {SIZE}x{SIZE}",
    "smollm2": f"SmolLM2-135M-Instruct, batch {LM_BATCH} x {LM_LENGTH} tokens, next-token loss",
}


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    if MODEL == "smollm2":
        from vpeft.backbones.causal_lm import load_causal_lm

        return load_causal_lm("smollm2")[0]
    return timm.create_model("vit_base_patch16_224", num_classes=CLASSES)


def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (4,), generator=g))]


def hf_lora(model: torch.nn.Module) -> torch.nn.Module:
    """HF PEFT's LoRA as users would set it up for the same adapter as vpeft's default ``lora``."""
    from peft import LoraConfig, get_peft_model

    if MODEL == "smollm2":  # vpeft's default: r=8, alpha=8, dropout 0.1 on q and v
        config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
        return get_peft_model(model, config)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))


def frozen_backprop(model: torch.nn.Module, base: torch.nn.Module) -> None:
    model.requires_grad_(False)
    if MODEL == "smollm2":
        for layer in model.model.layers:  # zero biases: the output is unchanged, their gradient needs the backward
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.bias = torch.nn.Parameter(proj.weight.new_zeros(proj.out_features))
        return
    for block in model.blocks:  # own copies: the base's (shared) tensors stay frozen
        block.attn.qkv.bias = torch.nn.Parameter(block.attn.qkv.bias.detach().clone())
    model.head = copy.deepcopy(base.head).requires_grad_(True)


def method_and_options(variant: str) -> tuple[str, dict]:
    """``lora:dropout=0.0:r=16`` -> ``("lora", {"dropout": 0.0, "r": 16})``: a method with options other than its
    defaults, to time what one option costs (values are Python literals)."""
    method, *pairs = variant.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sep = ""
        if not sep or not key:
            raise ConfigError(
                f"--methods {variant!r}: options are key=value with a Python literal value "
                f"(lora:dropout=0.0), got {pair!r}."
            )
    return method, options


def split_variants(text: str) -> list[str]:
    """``--methods`` split at the commas outside brackets: ``lora,adapter:targets=('mlp_in','mlp_out')`` is two."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p for p in (*parts, text[start:]) if p]


def set_grad_checkpointing(model: torch.nn.Module, on: bool) -> None:
    if MODEL == "smollm2":
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    model.set_grad_checkpointing(on)


def build(variant: str, base: torch.nn.Module, grad_ckpt: bool, own: bool = False) -> torch.nn.Module:
    """The variant on a copy of ``base``, or on ``base`` itself with ``own``. Copies of variants that leave the base
    frozen share its tensors (one base model in memory, not one per variant); full fine-tuning trains them, so it gets
    its own."""
    memo = {} if variant == "full" else {id(p): p for p in base.parameters()}
    model = base if own else copy.deepcopy(base, memo)
    if variant == HF_LORA:
        model = hf_lora(model)
        inner = model.base_model.model
    elif variant == FLOOR:
        frozen_backprop(model, base)
        inner = model
    else:
        method, options = method_and_options(variant)
        cal = calibration() if lookup(METHODS, method, "method (--methods)").needs_calibration else None
        vpeft.apply_method(model, method, calibration=cal, **options)
        inner = model
    set_grad_checkpointing(inner, grad_ckpt)
    return model


def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if MODEL == "smollm2":
        ids = torch.randint(0, 49152, (LM_BATCH, LM_LENGTH), generator=g).to(device)
        return ids, ids
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device)
    return x, torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits if MODEL == "smollm2" else model(x)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if MODEL == "smollm2":  # next-token cross-entropy, as the Trainer computes it
        return model(input_ids=x, labels=y).loss
    return F.cross_entropy(model(x), y)


def step_fn(model: torch.nn.Module, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, y = batch(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()

    return step


def timed(fn, device: torch.device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def child_peak_memory(variant: str, grad_ckpt: bool, default_allocator: bool = False) -> float:
    """Peak memory (MB) of a fresh process that builds the variant and runs three training steps: GPU memory
    allocated on CUDA, resident set size on the CPU (with a fixed mmap threshold unless ``default_allocator``)."""
    cmd = [sys.executable, __file__, "--memory-child", variant, "--model", MODEL]
    cmd += ["--grad-ckpt"] if grad_ckpt else []
    env = dict(os.environ)
    if not default_allocator:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # setting it at all turns the dynamic raise off
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(variant: str, grad_ckpt: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(variant, base_model().to(device), grad_ckpt, own=True).to(device).train()
    step = step_fn(model, device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident set size. ``VmHWM`` starts afresh at exec; ``ru_maxrss`` would carry over the
    parent's peak into a child started with fork+exec."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_table(variants: list[str], grad_ckpt: bool, default_allocator: bool) -> None:
    """Peak memory of each variant (one child process each, one at a time), printed as a markdown table as each
    child finishes. Not affected by other load on the machine, unlike the timings."""
    allocator = "glibc default" if default_allocator else "fixed mmap threshold"
    print(f"Gradient checkpointing: {'on' if grad_ckpt else 'off'}; CPU allocator: {allocator}\n")
    print("| variant | peak MB | x full | x HF LoRA |\n| --- | ---: | ---: | ---: |", flush=True)
    peak = {}
    for v in variants:
        peak[v] = child_peak_memory(v, grad_ckpt, default_allocator)
        full, hf = peak.get("full", float("nan")), peak.get(HF_LORA, float("nan"))
        print(f"| {v} | {peak[v]:.0f} | {peak[v] / full:.3f} | {peak[v] / hf:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vit_b16", "smollm2"), default="vit_b16", help="the workload")
    parser.add_argument("--methods", help="comma-separated vpeft methods (default: all registered; smollm2: lora)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, which other load on a shared machine barely moves (use it with --threads "
        "1: idle OpenMP threads spin and count)",
    )
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--out", type=Path, help="markdown table (default V-PEFT-Bench/perf/results/<device>.md)")
    parser.add_argument("--memory-only", action="store_true", help="only the peak memory table (no timing)")
    parser.add_argument("--no-memory", action="store_true", help="only the timings (memory: --memory-only)")
    parser.add_argument("--default-allocator", action="store_true", help="CPU peak: glibc's own mmap threshold")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    if args.methods is None:
        args.methods = "lora" if MODEL == "smollm2" else "all"
    if args.memory_child:
        return memory_child(args.memory_child, args.grad_ckpt)

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = sorted(METHODS) if args.methods == "all" else split_variants(args.methods)
    references = ["full", FLOOR, HF_LORA] if MODEL == "smollm2" else ["full", "linear", FLOOR, HF_LORA]  # no LM head
    variants = references + [m for m in methods if m not in ("full", "linear")]
    if args.memory_only:
        return memory_table(variants, args.grad_ckpt, args.default_allocator)
    base = base_model().to(device)
    models = {v: build(v, base, args.grad_ckpt).to(device).train() for v in variants}
    steps = {v: step_fn(m, device) for v, m in models.items()}
    x = batch(device)[0]
    base.eval()

    adapted = [v for v in models if v not in ("full", "linear", FLOOR)]
    infer = {"base": base} | {f"{v} unmerged": models[v] for v in adapted}
    for v in methods:
        method = method_and_options(v)[0]
        if method in METHODS and METHODS[method].mergeable and method not in ("full", "linear"):
            merged = copy.deepcopy(models[v])  # its own base tensors: merging writes into them
            vpeft.merge(merged)
            infer[f"{v} merged"] = merged
    step_times = {v: [] for v in steps}
    infer_times = {k: [] for k in infer}
    for fn in steps.values():  # warm-up: allocator, optimizer state, kernels
        fn()
    for _ in range(args.reps):
        for v, fn in steps.items():
            step_times[v].append(timed(fn, device, clock))
        with torch.no_grad():
            for k, m in infer.items():
                m.eval()
                infer_times[k].append(timed(lambda m=m: forward(m, x), device, clock))
        for m in models.values():  # the unmerged inference rows are the training models: back to training mode,
            m.train()  # where dropout and Hugging Face's gradient checkpointing act
    peak = {v: float("nan") for v in steps}
    if not args.no_memory:
        peak = {v: child_peak_memory(v, args.grad_ckpt, args.default_allocator) for v in steps}

    step_ms = {v: 1000 * statistics.median(t) for v, t in step_times.items()}
    infer_ms = {k: 1000 * statistics.median(t) for k, t in infer_times.items()}
    machine = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    )
    cores = torch.get_num_threads()
    lines = [
        f"# Speed and memory: {machine} ({cores} threads), torch {torch.__version__}, timm {timm.__version__}",
        "",
        f"`python V-PEFT-Bench/perf/speed.py{'' if MODEL == 'vit_b16' else ' --model ' + MODEL}"
        f"{' --grad-ckpt' if args.grad_ckpt else ''} --reps {args.reps}"
        f"{f' --threads {args.threads}' if args.threads else ''}{' --clock cpu' if args.clock == 'cpu' else ''}"
        f"{'' if args.methods == 'all' else ' --methods ' + args.methods}{' --no-memory' if args.no_memory else ''}`; "
        f"{WORKLOADS[MODEL]}, AdamW; medians of {args.reps} interleaved rounds"
        + (" of process CPU time." if args.clock == "cpu" else "."),
        f"Gradient checkpointing: {'on' if args.grad_ckpt else 'off'}. "
        + (
            "Peak memory: not measured (`--no-memory`)."
            if args.no_memory
            else "Peak memory: "
            + ("max_memory_allocated" if device.type == "cuda" else "peak RSS")
            + ("" if device.type == "cuda" or args.default_allocator else " (fixed mmap threshold)")
            + " of a child process per variant (MB)."
        ),
        "",
        "x floor: the ratio of medians to `frozen_backprop`'s, then the least and greatest of the per-round ratios "
        "(each round times every variant once, so a round's ratio is the comparison least touched by other load).",
        "",
        "| variant | step ms | x full | x floor | x floor, rounds | x HF LoRA |"
        + ("" if args.no_memory else " peak MB | x full |"),
        "| --- | ---: | ---: | ---: | ---: | ---: |" + ("" if args.no_memory else " ---: | ---: |"),
    ]
    for v in steps:
        rounds = [t / f for t, f in zip(step_times[v], step_times[FLOOR], strict=True)]
        memory = "" if args.no_memory else f" {peak[v]:.0f} | {peak[v] / peak['full']:.3f} |"
        lines.append(
            f"| {v} | {step_ms[v]:.1f} | {step_ms[v] / step_ms['full']:.3f} | {step_ms[v] / step_ms[FLOOR]:.3f} "
            f"| {min(rounds):.3f}-{max(rounds):.3f} | {step_ms[v] / step_ms[HF_LORA]:.3f} |{memory}"
        )
    lines += ["", "| inference | ms | x base |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {ms:.1f} | {ms / infer_ms['base']:.3f} |" for k, ms in infer_ms.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    name = ("gpu-" if device.type == "cuda" else "cpu-") + ("" if MODEL == "vit_b16" else f"{MODEL}-")
    name += "ckpt" if args.grad_ckpt else "plain"
    out = args.out or Path(__file__).parent / "results" / f"{name}.md"
    rounds_ms = {v: [1000 * t for t in ts] for v, ts in step_times.items()}
    peak_mb = None if args.no_memory else peak
    record = dict(step_ms=step_ms, step_rounds_ms=rounds_ms, infer_ms=infer_ms, peak_mb=peak_mb, machine=machine)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


if __name__ == "__main__":
    sys.exit(cli.run(main))
