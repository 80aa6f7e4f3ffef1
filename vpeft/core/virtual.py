"""Virtual tokens: the model-level call rewrite that prompt tuning and prefix tuning need (issue 20, gap G7).

Some methods add tokens the input does not have: prompt tuning prepends ``p`` learned embeddings to the input
embeddings (Lester et al. 2021), prefix tuning prepends ``p`` learned keys and values to every attention layer (Li and
Liang 2021). A language model sizes its attention mask, position ids, labels and key/value cache to the input before
its layers run, so such tokens cannot be inserted by a wrapped layer (what VPT does between the blocks of a ViT, whose
call carries none of these); the model's call itself is rewritten.

How it composes with the per-layer injection (:mod:`vpeft.core.inject`), with no second mechanism: the method's
tensors live in an ordinary :class:`~vpeft.core.AdapterModule` placed on the model's input token embedding, a target
like any other, so ``add_adapter``, ``set_adapter``, ``delete_adapter``, ``disabled()``, the trainable flags, the
adapter files and the parameter report treat it as they treat LoRA. Its wrapper computes the embedding unchanged. The
module declares ``virtual`` = ``"embeddings"`` (it provides ``virtual_embeddings(batch)``, ``(B, p, D)``) or
``"cache"`` (``virtual_cache(batch)``, one ``(key, value)`` pair of ``(B, kv_heads, p, head_dim)`` per layer).

What is new is two hooks on the *call site*, the shallowest module with ``get_input_embeddings()`` and a ``config``
(a Hugging Face model: the ``LlamaForCausalLM`` itself, or the ``BertModel`` inside vpeft's ``TextClassifier``). They
run only while the module that ``get_input_embeddings()`` returns is a wrapper whose active adapter has virtual
tokens; disabled, or with another adapter active, the call is the model's own. On a call:

* ``attention_mask`` (2-D) gets ``p`` ones in front; a 4-D mask is refused (its layout is the model's business).
* The cache decides whether the virtual tokens are already in: a call without one, or with an empty one, is a first
  call (a forward, or the prefill of ``generate()``); a call whose cache holds tokens continues an earlier call of this
  model (a decoding step), whose cache holds the virtual tokens already, so only the mask and positions change.
* ``"embeddings"``, first call: ``inputs_embeds = [prompts; embed(input_ids)]``, ``token_type_ids`` get ``p`` zeros,
  token-level ``labels`` ``p`` times -100; the outputs that have a token axis (``logits`` of a token-level head,
  ``last_hidden_state``, every ``hidden_states``) lose the ``p`` virtual positions again, so the caller sees one output
  per input token (HF PEFT returns them; a departure that lets the tasks' losses and poolings run unchanged).
  ``attentions`` keep them.
* ``"cache"``, first call: a ``DynamicCache`` (the caller's, if it passed an empty one) is filled with the prefixes
  before the model runs, so the input tokens take positions ``p..p+L-1`` as in HF PEFT. Training with transformers'
  gradient checkpointing is refused: it runs each checkpointed layer without the cache (HF PEFT 0.21.2 then fails
  on a mask of p + L keys against L).
* ``position_ids``, when passed: ``+p``, and for the prompts' first call ``0..p-1`` in front, so left padding keeps the
  positions ``generate()`` computes from the mask (HF PEFT drops them for prompt tuning).

VPT (vpeft/methods/vpt.py), the vision instance of prompts, stays on its per-block wrappers: a ViT's call carries
nothing for this rewrite to extend, and deep VPT's per-block prompt tokens are neither prompts prepended once nor a
key/value prefix (vpt.py says more).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..deps import require
from ..errors import ConfigError
from .layers import Adapted
from .modules import WHOLE

_STRIP = "_vpeft_strip"  # on the call site, between its two hooks: the input's length, when prompts were prepended
_SEQUENCE_OUTPUTS = ("logits", "last_hidden_state")


def call_site(model: nn.Module) -> nn.Module | None:
    """The shallowest module of ``model`` (itself included) that has ``get_input_embeddings()`` and a ``config``."""
    queue = [model]
    while queue:
        module = queue.pop(0)
        if callable(getattr(module, "get_input_embeddings", None)) and getattr(module, "config", None) is not None:
            return module
        queue.extend(m.base_layer if isinstance(m, Adapted) else m for m in module.children())
    return None


def require_call_site(model: nn.Module, method: str) -> nn.Module:
    """:func:`call_site`, or a :class:`~vpeft.errors.ConfigError` saying why a method with virtual tokens refuses."""
    site = call_site(model)
    if site is None:
        raise ConfigError(
            f"method {method!r} adds virtual tokens to a language model's call (its input embeddings, attention mask, "
            f"position ids and key/value cache), and {type(model).__name__} holds no module with "
            "get_input_embeddings() and a config (a Hugging Face transformers model) whose call it could rewrite. "
            "Use it on a transformers language model, or a model that contains one; for prompt tokens in a vision "
            "transformer use vpt_shallow or vpt_deep."
        )
    return site


def input_embedding(site: nn.Module) -> nn.Module:
    """The token embedding the call site reads its input through (the base module, not a wrapper)."""
    embedding = site.get_input_embeddings()
    return embedding.base_layer if isinstance(embedding, Adapted) else embedding


def install_hooks(site: nn.Module) -> list[Any]:
    """The two hooks on ``site``; the handles go into the adapter state, which removes them with the last adapter."""
    return [
        site.register_forward_pre_hook(_before, with_kwargs=True),
        site.register_forward_hook(_after, with_kwargs=True),
    ]


def _active_virtual(site: nn.Module) -> nn.Module | None:
    wrapper = site.get_input_embeddings()
    if not isinstance(wrapper, Adapted):
        return None
    parts = wrapper.active_parts()
    module = parts[WHOLE] if parts is not None and WHOLE in parts else None
    return module if getattr(module, "virtual", None) else None


def _as_kwargs(site: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of the call under their names (``model(ids)`` passes ``input_ids`` positionally)."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(site.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _cache_key(site: nn.Module, kwargs: dict[str, Any]) -> str:
    """``cache`` (transformers 5) or ``past_key_values`` (older models and remote code): the name the call uses."""
    for key in ("cache", "past_key_values"):
        if kwargs.get(key) is not None:
            return key
    params = inspect.signature(site.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _before(site: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    site.__dict__[_STRIP] = 0
    module = _active_virtual(site)
    if module is None:
        return None
    kwargs = _as_kwargs(site, args, kwargs)
    p = module.num_virtual_tokens
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    reference = embeds if embeds is not None else ids
    if reference is None:
        raise ValueError(f"{type(site).__name__} was called without input_ids or inputs_embeds.")
    batch = reference.shape[0]
    key = _cache_key(site, kwargs)
    cache = kwargs.get(key)
    first = cache is None or cache.get_seq_length() == 0

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(
                f"{module.virtual} virtual tokens extend a (batch, tokens) attention mask; this call passes one of "
                f"shape {tuple(mask.shape)}. Pass the 2-D padding mask and let the model build its own."
            )
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        shifted = positions + p
        if module.virtual == "embeddings" and first:
            front = torch.arange(p, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], p)
            shifted = torch.cat([front, shifted], dim=-1)
        kwargs["position_ids"] = shifted

    if not first:
        return (), kwargs
    if module.virtual == "cache":
        if site.training and torch.is_grad_enabled() and getattr(site, "is_gradient_checkpointing", False):
            raise ConfigError(
                "prefix tuning puts its keys and values in the model's cache, and transformers' gradient "
                f"checkpointing (on in {type(site).__name__}) runs each checkpointed layer without the cache, so the "
                "prefix would be dropped. Train it without gradient checkpointing (model.grad_checkpointing: false), "
                "or use prompt_tuning, whose prompts are inputs."
            )
        if cache is None:
            transformers = require("transformers", "hf", "prefix tuning's key/value cache")  # call sites are HF models
            cache = transformers.DynamicCache(config=site.config)
        for layer, (k, v) in enumerate(module.virtual_cache(batch)):
            cache.update(k, v, layer)
        kwargs[key] = cache
        return (), kwargs

    if embeds is None:
        embeds = site.get_input_embeddings()(ids)
    kwargs["inputs_embeds"] = torch.cat([module.virtual_embeddings(batch).to(embeds.dtype), embeds], dim=1)
    kwargs["input_ids"] = None
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], p), types], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == reference.shape[1]:  # token-level labels
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], p), -100), labels], dim=1)
    site.__dict__[_STRIP] = reference.shape[1]
    return (), kwargs


def _after(site: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    length = site.__dict__.pop(_STRIP, 0)
    if not length:
        return None

    def real(t: Tensor) -> Tensor:
        # the last ``length`` positions are the input's; fewer come back when the caller keeps only the last logits
        # (generate's logits_to_keep), and then none of them is a prompt's
        return t[:, t.shape[1] - length :] if t.shape[1] > length else t

    if isinstance(output, Tensor):
        return real(output) if output.dim() >= 3 else output
    if hasattr(output, "keys"):  # a transformers ModelOutput
        for name in _SEQUENCE_OUTPUTS:
            value = output.get(name)
            if isinstance(value, Tensor) and value.dim() >= 3:
                output[name] = real(value)
        hidden = output.get("hidden_states")
        if isinstance(hidden, tuple):
            output["hidden_states"] = tuple(real(h) for h in hidden)
        return output
    if isinstance(output, tuple):  # return_dict=False: the token-axis tensors are those as long as the rewritten input
        full = kwargs["inputs_embeds"].shape[1]
        return tuple(real(o) if isinstance(o, Tensor) and o.dim() >= 3 and o.shape[1] == full else o for o in output)
    return None
