"""Interoperability with other adapter libraries' file formats (Hugging Face PEFT)."""

from .hf_peft import export_hf_peft, import_hf_peft

__all__ = ["export_hf_peft", "import_hf_peft"]
