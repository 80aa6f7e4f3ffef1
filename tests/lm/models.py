"""Three tiny random language models built from ``transformers`` configs: the architectures LM methods must handle.

- BERT (an encoder, separate q/k/v ``Linear``, a sequence-classification head named ``classifier``);
- GPT-2 (a decoder whose attention is one fused ``c_attn`` ``Conv1D``: weights stored (in, out));
- Llama (a decoder with grouped-query attention: 4 query heads share 2 key/value heads, so k and v are narrower).

Dropout is off in each so that two copies trained on the same batches stay comparable step by step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 60
WIDTH = 32


def tiny_bert(num_labels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


TINY_LMS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def batches(
    count: int, seed: int = 0, batch: int = 3, length: int = 9, padding: str = "right"
) -> list[dict[str, torch.Tensor]]:
    """Random token batches with one padded sequence each (on the ``padding`` side), and class labels (used by BERT
    only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if padding == "right":
            mask[-1, length - 3 :] = 0
        else:
            mask[-1, :3] = 0
        labels = torch.randint(0, 3, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor], skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): cross-entropy on the class for BERT, next-token cross-entropy on unpadded tokens otherwise.
    ``skip``: leading positions of the logits that are no input token's (HF PEFT's prompt-tuning outputs)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if skip:
        logits = logits[:, skip:]
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, batch["labels"]), logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    return loss, logits
