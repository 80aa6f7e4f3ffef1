"""Peak memory of a SNELL training step against LoRA and against dense sparse tuning, on ViT-B/16.

    python V-PEFT-Bench/perf/snell_memory.py                        # CPU here, or the GPU when there is one
    python V-PEFT-Bench/perf/snell_memory.py --batch 8 --out V-PEFT-Bench/perf/results/cpu-snell-memory.md

Every variant adapts the same weights, SNELL's defaults: q, k, v, the attention output and both MLP layers of all 12
blocks of timm ``vit_base_patch16_224`` (random weights: memory does not depend on them; 100 classes, the head
trained too), and trains with AdamW on ``--batch`` random 224x224 images for three steps. Variants:

* ``lora_r8``: vpeft's LoRA at r = 8 on those targets; ``lora_r32``: at r = 32, SNELL's parameter count;
* ``snell``: the defaults (r = 32, s = 0.4, the kernel matrix recomputed in backward); ``snell_no_ckpt``: the same
  keeping every layer's dense kernel matrix for backward, to show what the checkpoint saves;
* ``dense_sparse``: sparse tuning as it is usually implemented: a full-size trainable delta per weight, multiplied
  by a fixed mask of the same share of entries (SNELL's own at initialisation); autograd computes the delta's dense
  gradient and AdamW keeps two dense moments, so memory grows with the weights, not the mask.

Each variant runs in a fresh child process: on CUDA its ``max_memory_allocated``; on the CPU its peak resident set
size (``VmHWM``) with glibc's mmap threshold fixed at 128 KiB, so every tensor of that size or more is returned to
the system when freed and the peak is that of the tensors alive at once (as in ``speed.py``). The base model's
weights (86M floats, 330 MB) and the activations are in every number; the differences are the methods'.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vpeft
from vpeft.core import AdapterModule, Target
from vpeft.engine import cli
from vpeft.files import atomic_write
from vpeft.methods import METHODS
from vpeft.methods._blocks import dropout
from vpeft.methods.snell import SNELL, SNELLConfig

TARGETS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
VARIANTS = {
    "lora_r8": ("lora", {"targets": TARGETS, "r": 8}),
    "lora_r32": ("lora", {"targets": TARGETS, "r": 32}),
    "snell": ("snell", {}),
    "snell_no_ckpt": ("snell", {"checkpoint": False}),
    "dense_sparse": ("dense_sparse", {}),
}


class DenseSparse(AdapterModule):
    """Sparse tuning with a dense trainable delta: ``y + (D ⊙ M) dropout(x)``, D (out, in) zeros, M a fixed mask."""

    Config = SNELLConfig
    wraps = ("linear",)
    mergeable = True

    def __init__(self, target: Target, config: SNELLConfig, shared: nn.Module | None = None):
        super().__init__(target, config, shared)
        with torch.no_grad():  # SNELL's mask at initialisation: the same rule and share of entries
            mask = SNELL(target, config).delta_weight() != 0
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros(target.out_features, target.in_features))
        self.dropout = dropout(config.dropout)

    def delta_weight(self) -> Tensor:
        return self.delta * self.mask

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y + F.linear(self.dropout(x), self.delta_weight())


def child(variant: str, batch: int) -> None:
    METHODS["dense_sparse"] = DenseSparse
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    method, options = VARIANTS[variant]
    report = vpeft.apply_method(model, method, **options)
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 100, (batch,), generator=g).to(device)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
        peak = int(line.split()[1]) / 1024
    print(report.trainable, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch)
        return
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # setting it at all turns glibc's dynamic raise off
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    lines = [
        f"Peak memory of three AdamW steps, ViT-B/16 batch {args.batch}, {device}, torch {torch.__version__}; "
        f"targets q, k, v, attn_out, mlp_in, mlp_out of all 12 blocks, head trained.",
        "",
        "| variant | trainable (adapter) | peak MB | x lora_r8 |",
        "| --- | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    peaks = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()
        trainable, peaks[variant] = int(out[-2]), float(out[-1])
        ratio = peaks[variant] / peaks["lora_r8"] if "lora_r8" in peaks else float("nan")
        lines.append(f"| {variant} | {trainable:,} | {peaks[variant]:.0f} | {ratio:.3f} |")
        print(lines[-1], flush=True)
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    sys.exit(cli.run(main))
