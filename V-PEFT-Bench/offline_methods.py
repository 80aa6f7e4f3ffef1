"""Every method on the offline quickstart task, against its linear probe: the Fashion-MNIST-pretrained tiny ViT
(``checkpoints/vit_tiny_fmnist.safetensors``) transferred to scikit-learn's digits with ``configs/quickstart.yaml``.

    python V-PEFT-Bench/offline_methods.py                           # all registered methods
    python V-PEFT-Bench/offline_methods.py --methods linear,spt_lora --out /tmp/offline.md

Each method runs with its defaults, except where a default is set for ViT-B/16 and must be scaled to this 460k
parameter model (listed in ``SCALED``). One seed; the table is a smoke-level comparison on a small task, not a
leaderboard.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpeft.engine import cli  # noqa: E402
from vpeft.engine.config import load_config  # noqa: E402
from vpeft.engine.train import train  # noqa: E402
from vpeft.methods import METHODS  # noqa: E402

# Defaults written for ViT-B/16 (768 wide, 12 blocks) scaled to the tiny ViT (96 wide, 4 blocks).
SCALED = {
    "spt_lora": ["method.param_budget=0.012"],  # about LoRA's 12,288 parameters here
    "spt_adapter": ["method.param_budget=0.012"],
    "salt": ["method.r_lora=8"],  # the released r_lora=256 is wider than this model
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "V-PEFT-Bench" / "results" / "offline_methods.md")
    args = parser.parse_args()
    methods = sorted(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"method.name={name}", *SCALED.get(name, [])])
            s = train(cfg, Path(tmp) / name)
            rows.append(
                (name, s["trainable_params"], s["test"]["top1"], s["wall_seconds"], " ".join(SCALED.get(name, [])))
            )
            print(f"{name}: {s['test']['top1']:.2f}%", flush=True)
    chosen = ["--methods", args.methods] if args.methods != "all" else []
    command = shlex.join(["python", "V-PEFT-Bench/offline_methods.py", *chosen])
    linear = next((top1 for name, _, top1, *_ in rows if name == "linear"), None)
    lines = [
        "# Every method on the offline quickstart task",
        "",
        f"`{command}`: `configs/quickstart.yaml` (Fashion-MNIST-pretrained tiny ViT -> scikit-learn digits, 15 epochs,",
        "seed 0, CPU) with `--set method.name=<method>`. The `lora` row is the quickstart's LoRA run",
        "(`bash tools/quickstart.sh`), the `linear` row its linear probe: this table is generated, never edited.",
        "",
        "| method | trainable | test top-1 | vs linear probe | wall s | scaled options |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, params, top1, wall, scaled in rows:
        delta = f"{top1 - linear:+.2f}" if linear is not None else "-"
        lines.append(f"| `{name}` | {params:,} | {top1:.2f}% | {delta} | {wall:.0f} | {scaled} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(cli.run(main))
