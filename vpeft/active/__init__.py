"""Active learning over a task's train split: STAR's selection rule (:mod:`vpeft.active.star`, arXiv:2403.01165) and
the loop that trains each round with the engine (:mod:`vpeft.active.loop`, ``tools/star.py``). The loop's rounds are
runs the engine trains, so this package sits above it."""

from .loop import STRATEGIES, Budget, Settings, check_request, curve, merge_results, run_active
from .star import dynamic_uncertainty, dynamic_weight, entropy, mc_entropy, minmax, random_k, top_k

__all__ = [
    "STRATEGIES",
    "Budget",
    "Settings",
    "check_request",
    "curve",
    "dynamic_uncertainty",
    "dynamic_weight",
    "entropy",
    "mc_entropy",
    "merge_results",
    "minmax",
    "random_k",
    "run_active",
    "top_k",
]
