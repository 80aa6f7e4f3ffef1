"""Artefact operations on trained adapters, outside the core and built on its public adapter tensors: ComPEFT
(sparsify and ternary-quantise an adapter's update for transfer; ``tools/compeft.py``)."""

from .compeft import Compressed, compress, decompress, load_compressed, save_compressed, stored_bytes

__all__ = ["Compressed", "compress", "decompress", "load_compressed", "save_compressed", "stored_bytes"]
