"""STAR's active-learning loop (vpeft.active, arXiv:2403.01165): accuracy per labelled example of STAR's selection
against random and plain-entropy selection, over seeds, on a text-classification task.

python tools/star.py configs/bench/recipes/lm_wordnet16.yaml --out runs/star --strategies star random entropy \\
    --seeds 0 1 2 --initial 160 --k 160 --rounds 6 --set method.name=lora train.epochs=8 train.max_steps=null

The train split is the pool, its labels hidden from the selection; each round trains the config's method (in this
process, through the engine) on the labelled items, scores the test split, and labels ``--k`` more items chosen by
the strategy. ``star`` also trains with the ``lora_b_decay`` plug-in (``--b-decay``; 0 for none, as a method without
LoRA's B needs). ``--set`` edits the config for every round (the budget per round: ``train.epochs``...; the recipe's
``train.max_steps`` would cap a round's steps, hence ``null``). ``OUT/results.jsonl`` has one line per seed, strategy
and round; ``OUT/curve.png`` plots test accuracy against labelled items (mean +- std over the seeds);
``OUT/seed<s>/<strategy>/round<r>/`` holds each round's labelled set (``data/train.jsonl``) and run (``run/``).
``--resume`` continues an interrupted call with the same arguments (``OUT/request.json``): finished rounds are kept,
a round cut short is trained again. Seeds can run as separate calls (one per core or machine, each its own ``--out``)
and be merged afterwards: ``python tools/star.py --merge runs/star_s0 runs/star_s1 runs/star_s2 --out runs/star``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vpeft.active import STRATEGIES, Budget, Settings, merge_results, run_active
from vpeft.engine import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, nargs="?", help="the run config (not with --merge)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DIR", help="merge these calls' seeds into --out")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="edits of the config (each round)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--initial", type=int, default=160, help="items labelled before the first round")
    parser.add_argument("--k", type=int, default=160, help="items labelled after each round")
    parser.add_argument("--rounds", type=int, default=6, help="training rounds (the last selects nothing)")
    parser.add_argument("--mc-passes", type=cli.at_least(1), default=3, help="STAR's Monte-Carlo dropout passes")
    parser.add_argument("--step", type=cli.at_least(0.0, float), default=0.1, help="STAR's lambda_t = step (t + 1)")
    parser.add_argument("--b-decay", type=cli.at_least(0.0, float), default=0.5, help="STAR's weight decay on B")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted call in --out (same arguments)")
    args = parser.parse_args(argv)
    if (args.merge is None) == (args.config is None):
        parser.error("give a config to run, or --merge DIR ... to merge earlier calls (not both)")
    if args.merge:
        rows = merge_results(args.merge, args.out)
        print(f"{len(rows)} rounds\n{args.out / 'results.jsonl'}\n{args.out / 'curve.png'}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vpeft").setLevel(logging.WARNING)  # the rounds' own epoch lines; the loop prints its own
    run_active(
        args.config,
        args.set,
        args.out,
        args.strategies,
        args.seeds,
        Budget(args.initial, args.k, args.rounds),
        Settings(args.mc_passes, args.step, args.b_decay),
        report=lambda line: print(line, flush=True),
        resume=args.resume,
    )
    print(f"{args.out / 'results.jsonl'}\n{args.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
