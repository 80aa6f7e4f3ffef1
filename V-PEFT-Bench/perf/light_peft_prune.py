"""Light-PEFT's physical pruning measured: parameters and training-step time before and after the pruning step.

    python V-PEFT-Bench/perf/light_peft_prune.py                        # tiny BERT and tiny Llama (random weights)
    python V-PEFT-Bench/perf/light_peft_prune.py --model smollm2 --batch 4 --length 256 --reps 5 --threads 1 \\
        --clock cpu --out V-PEFT-Bench/perf/results/cpu-smollm2-light-peft.md

A model gets ``light_peft`` at its defaults (``--options key=value`` to change them; ``estimate`` is set so that the
pruning step comes after ``--estimate-steps`` steps), then trains with AdamW on random tokens (next-token loss; class
labels for BERT) through the method's own hooks, as the training loop calls them: ``vpeft.control`` at the start of
each step (it prunes at step S), the method's L1 loss, ``vpeft.on_step`` after the backward pass (rank importance).
Step time is the median over ``--reps`` steps in the estimation phase (masks on the full model) and over ``--reps``
steps after the pruning step (the smaller model with the smaller LoRA), timed after one warm-up step each. Counted:
the base model's parameters (all of the frozen model, heads and embeddings included), the trainable ones, and what
the pruning step says it removed. Random weights prune by random masks, so the counts follow the ratios, not a task.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vpeft
from vpeft.core import StepContext, trainable_count
from vpeft.engine import cli
from vpeft.files import atomic_write


def tiny(name: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if name == "tiny_bert":
        config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=3)  # fmt: skip
        return transformers.BertForSequenceClassification(config)
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def load(name: str) -> torch.nn.Module:
    if name in ("tiny_bert", "tiny_llama"):
        return tiny(name)
    from vpeft.backbones.causal_lm import load_causal_lm

    return load_causal_lm(name, load_tokenizer=False)[0]


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    if logits.dim() == 2:
        return F.cross_entropy(logits, batch["labels"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def measure(name: str, args: argparse.Namespace, clock) -> dict:
    model = load(name).train()
    vocab = model.get_input_embeddings().num_embeddings
    base_params = sum(p.numel() for p in model.parameters())
    total = 4 * (args.estimate_steps + 2 * (args.reps + 1))  # S = round(estimate * total) = the estimation steps
    options = {"estimate": args.estimate_steps / total, **args.options}
    vpeft.apply_method(model, "light_peft", **options)
    optimizer = vpeft.build_optimizer(model, lr=1e-4)  # AdamW, the masks at their learning-rate multipliers
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, vocab, (args.batch, args.length), generator=g),
             "labels": torch.randint(0, 3, (args.batch,), generator=g)}  # fmt: skip
    times = {"before": [], "after": []}
    row = {"model": name, "base params": base_params, "trainable before": trainable_count(model)}
    pruned_at = None
    for step in range(total):
        ctx = StepContext(model, step, total, batch, lambda b: loss_of(model, b))
        notes = vpeft.control(model, ctx)
        ctx.follow(optimizer)
        if notes:
            pruned_at, row["change"] = step, "; ".join(notes)
            row["base params after"] = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
            row["trainable after"] = trainable_count(model)
        phase = "after" if pruned_at is not None else "before"
        tic = clock()
        loss = loss_of(model, batch)
        extra = vpeft.method_loss(model)
        (loss if extra is None else loss + extra).backward()
        vpeft.on_step(model, step, total, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = clock() - tic
        first = step == 0 if phase == "before" else step == pruned_at  # one warm-up step in each phase
        if not first and len(times[phase]) < args.reps:
            times[phase].append(elapsed)
        if pruned_at is not None and len(times["after"]) >= args.reps:
            break
    row["step before (ms)"] = 1000 * statistics.median(times["before"])
    row["step after (ms)"] = 1000 * statistics.median(times["after"])
    return row


def parse_options(items: list[str]) -> dict:
    import ast

    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny_bert", "tiny_llama"],
                        help="tiny_bert, tiny_llama, smollm2, or a local Hugging Face folder")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="timed steps in each phase")
    parser.add_argument("--estimate-steps", type=int, default=8, help="steps before the pruning step")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process time (shared machine)")
    parser.add_argument("--options", nargs="*", default=[], help="light_peft options, key=value")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    args.options = parse_options(args.options)
    if args.reps + 1 >= args.estimate_steps:
        args.estimate_steps = args.reps + 2  # room for a warm-up step and the timed ones before the pruning step
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    columns = ["model", "base params", "base params after", "trainable before", "trainable after", "step before (ms)",
               "step after (ms)"]  # fmt: skip
    machine = platform.processor() or platform.machine()
    lines = [
        f"Light-PEFT before/after the pruning step: batch {args.batch} x {args.length} tokens, AdamW, median of "
        f"{args.reps} steps per phase, {args.clock} clock, {torch.get_num_threads()} threads, {machine}, torch "
        f"{torch.__version__}; options {args.options or 'defaults'}.",
        "",
        "| " + " | ".join(columns) + " | pruned |",
        "|" + "---|" * (len(columns) + 1),
    ]
    print("\n".join(lines))
    for name in args.model:
        row = measure(name, args, clock)
        cells = [f"{row[c]:,}" if isinstance(row[c], int) else f"{row[c]:.1f}" if isinstance(row[c], float) else
                 str(row[c]) for c in columns]  # fmt: skip
        lines.append("| " + " | ".join(cells) + f" | {row.get('change', '-')} |")
        print(lines[-1])
        sys.stdout.flush()
    if args.out:
        text = "\n".join(lines) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
