"""Where a method's training step spends its time beyond LoRA's: torch's profiler over the training steps of
``speed.py``'s workloads, the operators ranked by the self CPU time they add to the reference variant's step.

    python V-PEFT-Bench/perf/profile_step.py --model smollm2 --methods snell,neuroada --out /tmp/profile.md

Each variant (``speed.py``'s names: a method, ``method:key=value`` options, ``hf_peft_lora``, ``frozen_backprop``) is
built on one shared frozen base, warmed up by one step and profiled over ``--steps`` steps on one thread. Per variant
the table lists the step time under the profiler, its ratio to the reference's (``--reference``, default ``lora``),
and the ``--top`` operators whose self time per step grew the most against the reference: that is the profile that
says why a method is slower than LoRA (the perf table asks for it beyond 1.5x). Profiler overhead inflates small
operators alike in every variant; ``speed.py`` gives the unprofiled times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import speed
import torch
from torch.profiler import ProfilerActivity, profile

from vpeft.engine import cli
from vpeft.files import atomic_write


def operator_times(model: torch.nn.Module, steps: int) -> dict[str, tuple[float, float]]:
    """Per operator: calls and self CPU milliseconds per training step, over ``steps`` profiled steps."""
    step = speed.step_fn(model, torch.device("cpu"))
    step()  # warm-up: allocator, AdamW's state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()}


def report(name: str, times: dict, reference: str, ref_times: dict, top: int) -> list[str]:
    total, ref_total = sum(ms for _, ms in times.values()), sum(ms for _, ms in ref_times.values())
    lines = [f"### `{name}`: {total:.0f} ms a step, {total / ref_total:.2f}x `{reference}`\n"]
    if name == reference:
        ranked = sorted(times, key=lambda k: -times[k][1])[:top]
        lines += ["| operator | calls | self ms |", "| --- | ---: | ---: |"]
        lines += [f"| `{k}` | {times[k][0]:.0f} | {times[k][1]:.1f} |" for k in ranked]
        return lines
    extra = {k: times[k][1] - ref_times.get(k, (0, 0.0))[1] for k in times}
    ranked = sorted(extra, key=lambda k: -extra[k])[:top]
    lines += [
        f"| operator | calls | self ms | `{reference}` calls | `{reference}` self ms | added ms | share of the gap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    gap = total - ref_total
    for k in ranked:
        calls, ms = times[k]
        ref_calls, ref_ms = ref_times.get(k, (0, 0.0))
        share = f"{100 * extra[k] / gap:.0f}%" if gap > 0 else "-"
        lines.append(f"| `{k}` | {calls:.0f} | {ms:.1f} | {ref_calls:.0f} | {ref_ms:.1f} | {extra[k]:+.1f} | {share} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vit_b16", "smollm2"), default="smollm2", help="the workload")
    parser.add_argument("--methods", required=True, help="comma-separated variants to explain")
    parser.add_argument("--reference", default="lora", help="the variant the others are compared with")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per variant")
    parser.add_argument("--top", type=int, default=10, help="operators listed per variant")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on, as speed.py's")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    speed.MODEL = args.model
    base = speed.base_model().train()
    variants = [args.reference, *(v for v in speed.split_variants(args.methods) if v != args.reference)]
    header = [
        f"# Step profiles: {speed.WORKLOADS[args.model]}, AdamW, one thread, {args.steps} profiled steps per variant"
        + (", gradient checkpointing" if args.grad_ckpt else ""),
        "",
        f"`python V-PEFT-Bench/perf/profile_step.py --model {args.model} --methods {args.methods} --steps "
        f"{args.steps} --top {args.top}{' --grad-ckpt' if args.grad_ckpt else ''}`. Self CPU time per step under "
        "torch's profiler, operators ranked by the time "
        f"they add to `{args.reference}`'s step.",
        "",
    ]
    print("\n".join(header), flush=True)
    lines, ref_times = list(header), None
    for variant in variants:
        model = speed.build(variant, base, grad_ckpt=args.grad_ckpt).train()
        times = operator_times(model, args.steps)
        del model
        ref_times = ref_times or times
        block = [*report(variant, times, args.reference, ref_times, args.top), ""]
        print("\n".join(block), flush=True)
        lines += block
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text("\n".join(lines)))


if __name__ == "__main__":
    sys.exit(cli.run(main))
