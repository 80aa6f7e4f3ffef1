"""Interoperability with other adapter libraries' file formats (Hugging Face PEFT: LoRA, DoRA, IA3, VeRA)."""

from .hf_peft import import_hf_peft
from .hf_peft_vectors import export_hf_peft  # IA3 and VeRA; the LoRA family through hf_peft

__all__ = ["export_hf_peft", "import_hf_peft"]
