"""MEFT's activation memory against LoRA's: the bytes of the tensors a training forward pass keeps for its backward
pass, counted by torch's saved-tensor hooks (not wall clock, not the process's peak).

    python V-PEFT-Bench/perf/meft_memory.py                                    # tiny random BERTs, depths 2 to 12
    python V-PEFT-Bench/perf/meft_memory.py --depths 2 4 8 12 24 --minilm-drift 0.1,0.1 0.1,1 1,0.1 0.5,0.5 1,1
    python V-PEFT-Bench/perf/meft_memory.py --hidden 768 --heads 12 --intermediate 3072 --depths 12 \\
        --batch 8 --length 128 --out V-PEFT-Bench/perf/results/cpu-bert-base-meft-memory.md    # BERT-base shapes

A random-weight ``BertForSequenceClassification`` of the given shapes (nothing is downloaded) gets ``lora`` (its
defaults: r = 8 on q and v), ``meft`` (reversible couplings, the defaults) or ``meft`` with ``reversible=false``
(the same coupling through autograd), then runs one training forward pass and its loss on random tokens. Every tensor
autograd saves for the backward pass is counted once per save (``torch.autograd.graph.saved_tensors_hooks``), frozen
weights included where an operation saves them: the bytes a backward pass needs alive. MEFT's reversible stack
saves its two final outputs; the embeddings, pooler and classifier save what they save under every method. MEFT's
backward pass then holds one layer's recomputation graph at a time on top of this (not counted here). The last
column is the largest relative difference (a norm per tensor) between MEFT's reversible float32 gradients and
autograd's on the same coupling: the rounding that dividing by lambda = beta = 0.1 amplifies at each layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vpeft
from vpeft.engine import cli
from vpeft.files import atomic_write

VARIANTS = {"lora": ("lora", {}), "meft": ("meft", {}), "meft (autograd)": ("meft", {"reversible": False})}


def bert(args: argparse.Namespace, depth: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=depth,
                                     num_attention_heads=args.heads, intermediate_size=args.intermediate,
                                     max_position_embeddings=max(512, args.length), num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(input_ids=ids).logits, labels)
    return total


def gradient_drift(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor | None, **options) -> float:
    """Largest relative difference, over MEFT's trainable tensors, between the reversible backward pass's gradients
    and autograd's on the same coupling (dropout off: the same function both ways), in ``model``'s dtype."""
    vpeft.apply_method(model, "meft", dropout=0.0, **options)
    layer = vpeft.core.layers_of(model, "default")[0]
    with torch.no_grad():  # a trained-looking adapter: the up-projections off zero
        for p in layer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    params = list(layer.parameters())
    grads = []
    for reversible in (True, False):
        layer.reversible = reversible
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        loss = F.cross_entropy(out.logits, labels) if labels is not None else out.last_hidden_state.square().mean()
        grads.append(torch.autograd.grad(loss, params))
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*grads, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--minilm-drift", nargs="*", metavar="LAMBDA,BETA",
                        help="also the float32 gradient drift on the pre-trained all-MiniLM-L6-v2 (6 layers, a local "
                             "package) at these lambda,beta pairs")  # fmt: skip
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (args.batch, args.length), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    lines = [
        f"Saved-tensor bytes of one training forward pass (MiB): random BERT, hidden {args.hidden}, "
        f"{args.heads} heads, FFN {args.intermediate}, batch {args.batch} x {args.length} tokens, float32.",
        "",
        "| layers | " + " | ".join(VARIANTS) + " | meft / lora | trainable lora | trainable meft | float32 gradient "
        "drift |",
        "|---:|" + "---:|" * (len(VARIANTS) + 4),
    ]
    print("\n".join(lines))
    for depth in args.depths:
        row, trainable = {}, {}
        for name, (method, options) in VARIANTS.items():
            model = bert(args, depth)
            trainable[name] = vpeft.apply_method(model, method, **options).trainable
            row[name] = saved_bytes(model, ids, labels) / 2**20
        cells = " | ".join(f"{row[n]:.2f}" for n in VARIANTS)
        drift = gradient_drift(bert(args, depth), ids, labels)
        lines.append(f"| {depth} | {cells} | {row['meft'] / row['lora']:.3f} | {trainable['lora']:,} | "
                     f"{trainable['meft']:,} | {drift:.1e} |")  # fmt: skip
        print(lines[-1])
        sys.stdout.flush()
    if args.minilm_drift:
        import transformers

        from vpeft.backbones.hf import minilm_path

        lines += ["", "Float32 gradient drift on pre-trained all-MiniLM-L6-v2 (6 layers), loss mean(h^2), batch "
                  f"{args.batch} x {args.length}:", "", "| lambda | beta | drift |", "|---:|---:|---:|"]  # fmt: skip
        print("\n".join(lines[-5:]))
        for pair in args.minilm_drift:
            lam, beta = (float(v) for v in pair.split(","))
            torch.manual_seed(0)
            model = transformers.AutoModel.from_pretrained(minilm_path(), local_files_only=True)
            drift = gradient_drift(model, torch.randint(1000, 20000, (args.batch, args.length), generator=g), None,
                                   lam=lam, beta=beta)  # fmt: skip
            lines.append(f"| {lam:g} | {beta:g} | {drift:.1e} |")
            print(lines[-1])
    if args.out:
        text = "\n".join(lines) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
