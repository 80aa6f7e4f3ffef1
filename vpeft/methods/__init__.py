"""The method registry: one line per method. Tests and tools pick every entry up from here."""

from ..core import AdapterModule
from . import baselines, bitfit, lora

METHODS: dict[str, type[AdapterModule]] = {
    "full": baselines.Full,
    "linear": baselines.LinearProbe,
    "bitfit": bitfit.BitFit,
    "lora": lora.LoRA,
}
