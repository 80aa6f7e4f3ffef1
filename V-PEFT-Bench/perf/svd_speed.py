"""Time the SVD that ``soma``, ``salt``, ``comp_lora`` and ``pissa`` take when an adapter is built: all 72 linear
weights of ViT-B/16 (q, k and v as separate 768 x 768 slices of qkv, proj, fc1 and fc2 in 12 blocks), or with
``--model smollm2`` all 210 projections of SmolLM2-135M (30 layers of q 576 x 576, k and v 192 x 576, o 576 x 576,
gate and up 1536 x 576, down 576 x 1536), median of 3 runs.

    python V-PEFT-Bench/perf/svd_speed.py [--model vit_b16|smollm2] [--compare] [--device cpu|cuda]

``--compare`` also times ``torch.linalg.svd(full_matrices=False)`` and ``torch.svd_lowrank(q=16)`` (top 16 only,
approximate) at torch's current thread count. Random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import timm
import torch

from vpeft.engine import cli
from vpeft.methods import _svd


def vit_b16_matrices(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    mats = []
    for blk in model.blocks:
        mats += list(blk.attn.qkv.weight.detach().chunk(3))  # q, k, v
        mats += [blk.attn.proj.weight.detach(), blk.mlp.fc1.weight.detach(), blk.mlp.fc2.weight.detach()]
    return [m.to(device).contiguous() for m in mats]


def smollm2_matrices(device: str) -> list[torch.Tensor]:
    """SmolLM2-135M's 210 projection shapes with Llama's init (normal, std 0.02): the SVD's cost depends on the
    shapes, and nothing is read from the GGUF file (25 s to dequantise)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    return [(0.02 * torch.randn(*shape, generator=g)).to(device) for _ in range(30) for shape in shapes]


def median_seconds(fn, mats: list[torch.Tensor], runs: int = 3) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds over ``runs`` passes through all matrices."""
    times, cpu = [], []
    for _ in range(runs):
        if mats[0].is_cuda:
            torch.cuda.synchronize()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        for w in mats:
            fn(w)
        if mats[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--model", choices=("vit_b16", "smollm2"), default="vit_b16")
    args = parser.parse_args()
    mats = (smollm2_matrices if args.model == "smollm2" else vit_b16_matrices)(args.device)
    _svd.svd(mats[0])  # warm-up: the first LAPACK call loads its kernels
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = "SmolLM2-135M" if args.model == "smollm2" else "ViT-B/16"
    print(f"{len(mats)} {name} matrices on {args.device}, {torch.get_num_threads()} threads, load {load:.1f}")
    rows = [("vpeft.methods._svd.svd (exact, all triplets)", _svd.svd, 3)]
    if args.compare:  # one pass each: the full SVD can take minutes on a busy machine
        rows.append(("torch.linalg.svd(full_matrices=False)", lambda w: torch.linalg.svd(w, full_matrices=False), 1))
        rows.append(("torch.svd_lowrank(q=16, niter=4), top 16", lambda w: torch.svd_lowrank(w, q=16, niter=4), 1))
    for name, fn, runs in rows:
        wall, cpu = median_seconds(fn, mats, runs)
        what = "median of 3" if runs == 3 else "1 run"
        print(f"{name:45s} {wall:6.2f} s wall, {cpu:6.2f} s CPU ({what})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
