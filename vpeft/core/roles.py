"""Roles: library-independent names for the places methods attach to.

A method's default ``targets`` are roles (LoRA: ``("q", "v")``), so one default serves timm ViTs, SAM, open_clip and
Hugging Face encoders. A role expands to the naming conventions below; conventions that do not fit a model (absent
names, a slice of a module that is not a fused projection) are skipped, and a role that fits nothing is an error.
Backbone families with other names add a pattern here.
"""

from __future__ import annotations

ROLES: dict[str, tuple[str, ...]] = {
    # one projection of attention; fused ``qkv`` Linears and nn.MultiheadAttention are sliced
    # (timm/SAM fused qkv, timm EVA, open_clip MHA, HF BERT, HF ViT, HF Llama, HF GPT-2)
    "q": (
        "attn.qkv[q]",
        "attn.q_proj",
        "attn[q]",
        "attention.self.query",
        "attention.attention.query",
        "self_attn.q_proj",
        "attn.c_attn[q]",
    ),
    "k": (
        "attn.qkv[k]",
        "attn.k_proj",
        "attn[k]",
        "attention.self.key",
        "attention.attention.key",
        "self_attn.k_proj",
        "attn.c_attn[k]",
    ),
    "v": (
        "attn.qkv[v]",
        "attn.v_proj",
        "attn[v]",
        "attention.self.value",
        "attention.attention.value",
        "self_attn.v_proj",
        "attn.c_attn[v]",
    ),
    "qkv": ("attn.qkv", "attn.c_attn"),
    "attn_out": ("attn.proj", r".*attn\.out_proj", "attention.output.dense", "self_attn.o_proj", "attn.c_proj"),
    "mlp_in": ("mlp.fc1", "mlp.c_fc", "mlp.lin1", "intermediate.dense", "mlp.up_proj"),  # lin1: segment_anything
    "mlp_out": ("mlp.fc2", "mlp.c_proj", "mlp.lin2", r".*layer\.\d+\.output\.dense", "mlp.down_proj"),
    # whole sub-blocks: their input is the normalised residual stream, their output goes back into it; blocks of timm,
    # open_clip, HF encoders (BERT, ViT), HF decoders (Llama ``layers``, GPT-2 ``h``)
    "attn": ("attn", "self_attn"),  # HF Llama, Mistral, Qwen
    "mlp": ("mlp", r".*layer\.\d+\.output\.dense"),
    # the norm the MLP reads in a pre-norm block, whose input is the residual stream (timm/SAM, open_clip, GPT-2, Llama)
    "mlp_norm": ("norm2", "ln_2", "post_attention_layernorm"),
    # the input token embedding of a language model (HF Llama/Mistral/Qwen, GPT-2, BERT, GPT-NeoX), where prompt and
    # prefix tuning keep their virtual tokens (vpeft/core/virtual.py)
    "embed": ("embed_tokens", "wte", "embeddings.word_embeddings", "embed_in"),
    "block": (r"(.*\.)?blocks\.\d+", r".*resblocks\.\d+", r".*encoder\.layer\.\d+", r".*layers\.\d+", r"(.*\.)?h\.\d+"),
    # every module inside a block; a method that wraps only Linears (the quantised-base methods) takes each Linear and
    # HF Conv1D there as a whole module, fused qkv included (Llama's gate_proj too, which no other role names)
    "in_block": (
        r"(.*\.)?blocks\.\d+\..+",
        r".*resblocks\.\d+\..+",
        r".*encoder\.layer\.\d+\..+",
        r".*layers\.\d+\..+",
        r"(.*\.)?h\.\d+\..+",
    ),
}
