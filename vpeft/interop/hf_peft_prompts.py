"""Hugging Face PEFT directories for prompt tuning and prefix tuning (``peft_type`` ``PROMPT_TUNING`` and
``PREFIX_TUNING``), in the inference form PEFT itself saves.

===============================================  ============================================================
vpeft                                            Hugging Face PEFT
===============================================  ============================================================
``prompt_tuning`` ``prompts`` (p, D)             ``prompt_embeddings`` (p, D); ``token_dim`` D
``prefix_tuning`` ``prefix`` (p, L * 2 * w)      ``prompt_embeddings`` (p, L * 2 * w); ``token_dim`` w, the
                                                   key/value width, ``num_attention_heads`` its heads
``prefix_tuning`` with ``projection``            the same: the MLP's output ``P_theta`` (PEFT saves that too,
                                                   and builds no MLP in inference mode); ``prefix_projection``
                                                   false in the config
===============================================  ============================================================

The model must be the transformers model whose call the adapter rewrites (vpeft's call site): a causal LM exports with
``task_type: CAUSAL_LM``, a base model (``BertModel``) with ``FEATURE_EXTRACTION``. An adapter with a task head is
refused: PEFT's sequence-classification wrapper names its own head (``classifier``/``score``) and vpeft's heads live
outside the transformers model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save as save_bytes
from torch import nn

from ..core import CONFIG_FILE, WEIGHTS_FILE, WHOLE, AdapterRecord, adapted_modules, call_site
from ..errors import ConfigError
from ..files import atomic_write


def export_prompts(model: nn.Module, directory: str | os.PathLike, name: str, record: AdapterRecord) -> Path:
    """Write the virtual-token adapter ``name`` of ``model`` as a PEFT directory (see the module docstring)."""
    if call_site(model) is not model:
        raise ConfigError(
            f"cannot export adapter {name!r} ({record.method}) to Hugging Face PEFT from {type(model).__name__}: PEFT "
            "wraps the transformers model itself, and this one holds it inside. Export from that model (the one with "
            "get_input_embeddings()), or save the adapter with vpeft.save_adapter."
        )
    adapted = list(adapted_modules(model, name))
    if any(a.head for a in adapted):
        raise ConfigError(
            f"cannot export adapter {name!r} ({record.method}) to Hugging Face PEFT: it trains a task head, which "
            "PEFT's prompt-learning models do not carry; save it with vpeft.save_adapter."
        )
    module = adapted[0].parts[WHOLE]
    options = record.config
    if record.method_cls.virtual == "embeddings":
        peft_type, embeddings = "PROMPT_TUNING", module.prompts.detach()
        width = embeddings.shape[1]
        heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers  # unused by PEFT's prompts
        extra = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    else:
        peft_type, embeddings = "PREFIX_TUNING", module.flat_prefix().detach()
        width, heads, layers = options.kv_heads * options.head_dim, options.kv_heads, options.num_layers
        extra = {"encoder_hidden_size": width, "prefix_projection": False}
    config = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else "FEATURE_EXTRACTION",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": options.num_virtual_tokens,
        "token_dim": width,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        **extra,
    }
    blob = save_bytes({"prompt_embeddings": embeddings.cpu().contiguous()}, metadata={"format": "pt"})
    directory = Path(directory)
    # weights first, config last: a directory with a config always has the matching tensors
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: Path(tmp).write_bytes(blob))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory
