"""Federated fine-tuning simulated in one process over non-IID client splits of a run config's task
(vpeft.federated.simulate): FedAvg, FFA-LoRA or LoRA-FAIR aggregation, or DP-FedAvg with opacus's accountant
(``--dp-clip``; with method dylora, DP-DyLoRA: one rank per round drawn by the server).

python tools/federated.py configs/bench/recipes/lm_wordnet16.yaml --out runs/fed_fair --rule lora_fair \\
    --clients 4 --beta 0.5 --rounds 4 --local-steps 8 --set data.val_split=val
python tools/federated.py configs/bench/recipes/lm_wordnet16.yaml --out runs/fed_ffa --rule ffa_lora \\
    --set method.name=ffa_lora data.val_split=val
python tools/federated.py configs/bench/recipes/lm_wordnet16.yaml --out runs/dp_dylora --dp-clip 0.5 \\
    --noise-multiplier 1.0 --clients 16 --clients-per-round 4 --set method.name=dylora data.val_split=val

Each round's evaluation (``--eval-split``), aggregation residual and epsilon go to ``OUT/metrics.jsonl``;
``OUT/summary.json`` has the final round and (DP) epsilon at delta; ``python tools/test.py OUT`` scores the final
adapter on the test split like any run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpeft.engine import cli
from vpeft.engine.config import load_config
from vpeft.federated import RULES, FedConfig, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="edits of the config")
    parser.add_argument("--rule", choices=RULES, default="fedavg")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration of the label split")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--lam", type=float, default=0.01, help="LoRA-FAIR's ridge")
    parser.add_argument("--dp-clip", type=float, default=None, help="DP-FedAvg: clip each client's update to this")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--eval-split", default="val", choices=("val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    fed = FedConfig(
        rule=args.rule,
        clients=args.clients,
        beta=args.beta,
        rounds=args.rounds,
        local_steps=args.local_steps,
        clients_per_round=args.clients_per_round,
        lam=args.lam,
        dp_clip=args.dp_clip,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        eval_split=args.eval_split,
        seed=args.seed,
    )
    simulate(cfg, fed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
