"""Federated fine-tuning on vpeft's adapter files: non-IID client splits, server aggregation (FedAvg, FFA-LoRA,
LoRA-FAIR), differential privacy (DP-SGD, DP-FedAvg with opacus's accountant; DP-DyLoRA) and a one-process
simulation (:func:`simulate`, ``tools/federated.py``). The aggregation and privacy functions work on plain tensor
dicts (``vpeft.core.adapter_tensors`` or a saved ``adapter_model.safetensors``); the simulation builds runs through
the engine, so this package sits above it."""

from .aggregation import RULES, aggregate, client_weights, fedavg, ffa_lora, lora_fair, lora_pairs, residual
from .privacy import Accountant, dp_fedavg, dp_sgd_gradient
from .simulate import FedConfig, simulate
from .split import dirichlet_split

__all__ = [
    "RULES",
    "Accountant",
    "FedConfig",
    "aggregate",
    "client_weights",
    "dirichlet_split",
    "dp_fedavg",
    "dp_sgd_gradient",
    "fedavg",
    "ffa_lora",
    "lora_fair",
    "lora_pairs",
    "residual",
    "simulate",
]
