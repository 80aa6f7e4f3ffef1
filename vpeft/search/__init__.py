"""Configuration search over training runs (AutoPEFT: multi-objective Bayesian optimisation of score and trainable
parameters; ``tools/autopeft.py``). Trials are runs the engine trains, so this package sits above it."""

from .autopeft import block_indices, overrides, pareto_front, search

__all__ = ["block_indices", "overrides", "pareto_front", "search"]
