"""The injection core: target selection, wrappers, adapter state and files. It knows no method, backbone or dataset."""

from .config import (
    DropProbability,
    FiniteFloat,
    LenientRank,
    MethodConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ProperFraction,
    Rank,
    build_config,
)
from .layers import WHOLE, AdapterModule
from .report import Report
from .targets import Target

__all__ = ["WHOLE", "AdapterModule", "MethodConfig", "Report", "Target", "build_config"]
__all__ += [  # the option types with their constraints, for the method configs
    "DropProbability",
    "FiniteFloat",
    "LenientRank",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "ProperFraction",
    "Rank",
]
