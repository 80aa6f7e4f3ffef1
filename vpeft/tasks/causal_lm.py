"""Causal language modelling, prompt -> answer: the loss on the answer tokens only; greedy exact match and answer
perplexity.

The model is the Hugging Face ``*ForCausalLM`` itself (``smollm2``, a ``.gguf`` file, a causal-LM folder), so
adapters keep HF's module names (they export to HF PEFT) and ``model.generate()`` works on the adapted model.

An item's prompt is ``data.options.prompt`` with ``{text}`` replaced by the item's text (default per data: an
instruction for ``wordnet_lemmas``, the text itself for ``jsonl``'s ``prompt`` field). With the tokenizer's chat
template (``data.options.chat_template``: ``auto`` uses it where the tokenizer has one, ``true`` requires it,
``false`` never uses it) the prompt is a user turn and the answer the assistant's reply, ended by the template's
end-of-turn token; without it the prompt is followed by a newline and the answer by the EOS token. ``shots: k``
puts k demonstrations (prompt and first answer of training items, drawn with ``train.seed`` and fixed per item)
before the prompt: the in-context baselines (method ``frozen``).

Training labels are -100 on the prompt and the padding: the loss is the mean cross-entropy over answer tokens, those
of a whole optimizer step (``loss_terms``: over the micro-batches of ``optim.accumulate`` and the data-parallel
processes, as one process holding the global batch computes it).
Evaluation: ``exact_match`` (percent; greedy ``generate()`` from the left-padded prompt, at most
``data.options.max_new_tokens`` tokens; the reply, or with ``data.options.answer_pattern`` (a regular expression) its
last match, the group where it has one, is compared after strip and lower-casing with each accepted answer of the
item), ``answer_ppl`` (exp of the mean NLL over the answer tokens of the first answer, sums over processes) and
``loss`` (that mean NLL).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import Dataset

from ..backbones.hf import load_language_model
from ..data.text import TextExample
from ..errors import ConfigError, DataError
from .base import Reduce, Task
from .text_classification import check_max_length, data_splits, text_options, too_long

# Defaults of data.options by data name. The lemma prompt is an instruction; a chat model often answers it with a
# sentence ('The base form of "geese" is "goose".'), so its reply is scored by its last word (a trained or few-shot
# model replies with the word alone), as lm-evaluation-harness's flexible extraction takes a reply's last number, and
# it gets room for that sentence.
DATA_DEFAULTS = {
    "wordnet_lemmas": {
        "prompt": 'What is the base form (the dictionary headword) of the English word "{text}"? Answer with the base '
                  "form only.",
        "answer_pattern": r"[A-Za-z][A-Za-z'-]*",
        "max_new_tokens": 24,
    },
}  # fmt: skip
TASK_OPTIONS = {"max_length": None, "chat_template": "auto", "shots": 0, "prompt": "{text}", "max_new_tokens": None,
                "answer_pattern": None}  # fmt: skip
ROLES = ("train", "val", "test")


class PromptDataset(Dataset):
    """Items ``(demonstrations, prompt, answers)``: the k demonstrations are ``(prompt, answer)`` pairs of training
    items chosen by ``(seed, role, index)``, so an item sees the same ones in every epoch and every run."""

    def __init__(self, examples: list[TextExample], prompt: str, demos: list[TextExample], shots: int, seed: int,
                 role: str):  # fmt: skip
        self.examples, self.prompt, self.demos, self.shots, self.seed = examples, prompt, demos, shots, seed
        self.role = ROLES.index(role)
        self.classes = None
        self.lengths: list[int] | None = None  # token counts of prompt and answer, set by the task

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[tuple[str, str]], str, tuple[str, ...]]:
        example = self.examples[index]
        demos = []
        if self.shots:
            rng = np.random.default_rng([self.seed, self.role, index])
            pool = [i for i in range(len(self.demos)) if not (self.role == 0 and i == index)]
            demos = [(self.format(self.demos[i].text), self.demos[i].answers[0])
                     for i in rng.choice(pool, self.shots, replace=False)]  # fmt: skip
        return demos, self.format(example.text), example.answers

    def format(self, text: str) -> str:
        return self.prompt.replace("{text}", text)


class CausalLMTask(Task):
    metric = "exact_match"

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        if cfg.model.head:
            raise ConfigError("model.head: a causal_lm model answers with its own LM head; remove model.head.")
        options, reader_options = text_options(cfg, {**TASK_OPTIONS, **DATA_DEFAULTS.get(cfg.data.name, {})})
        examples, _ = data_splits(cfg, "answer", reader_options)
        model, self.tokenizer, decoder = load_language_model(cfg.model.name)
        if not decoder:
            raise ConfigError(f"model.name {cfg.model.name!r} is an encoder; causal_lm needs a decoder (smollm2, a "
                              ".gguf file, a causal-LM folder).")  # fmt: skip
        self.template = self.use_chat_template(options["chat_template"])
        self.max_length = check_max_length(options["max_length"], model)
        shots = options["shots"]
        if not isinstance(shots, int) or isinstance(shots, bool) or not 0 <= shots < len(examples["train"]):
            raise ConfigError(f"data.options.shots must be an integer from 0 to the training items' count - 1, "
                              f"got {shots!r}.")  # fmt: skip
        prompt = options["prompt"]
        if not isinstance(prompt, str) or "{text}" not in prompt:
            raise ConfigError(f"data.options.prompt must be a string holding {{text}}, got {prompt!r}.")
        datasets = {role: PromptDataset(items, prompt, examples["train"], shots, cfg.train.seed, role)
                    for role, items in examples.items()}  # fmt: skip
        lengths = {role: [sum(map(len, self.encode(*item))) for item in ds] for role, ds in datasets.items()}
        too_long(lengths, self.max_length, "prompts with their answer")
        for role, dataset in datasets.items():
            dataset.lengths = lengths[role]  # data.group_by_length groups training batches by them
        longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"])
                      for items in examples.values() for e in items for a in e.answers)  # fmt: skip
        self.max_new_tokens = options["max_new_tokens"] or longest + 2  # room for the end token and a merge
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ConfigError(f"data.options.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        self.answer_pattern = compile_pattern(options["answer_pattern"])
        return model, datasets

    def use_chat_template(self, choice: Any) -> bool:
        if choice not in ("auto", True, False):
            raise ConfigError(f"data.options.chat_template must be auto, true or false, got {choice!r}.")
        has = bool(getattr(self.tokenizer, "chat_template", None))
        if choice is True and not has:
            raise ConfigError(
                f"data.options.chat_template is true, but the tokenizer of model.name {self.cfg.model.name!r} has no "
                "chat template (tokenizer_config.json / chat_template.jinja); set it to false or auto."
            )
        return has if choice == "auto" else choice

    def encode(self, demos: list[tuple[str, str]], prompt: str, answers: tuple[str, ...]) -> tuple[list, list]:
        """Token ids of the prompt (demonstrations included) and of the first answer with its end token."""
        tok = self.tokenizer
        if self.template:
            turns = [m for q, a in demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            turns.append({"role": "user", "content": prompt})
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            whole = tok.apply_chat_template([*turns, {"role": "assistant", "content": answers[0]}], tokenize=False)
            if not whole.startswith(text):
                raise ConfigError(f"the chat template of model.name {self.cfg.model.name!r} does not continue the "
                                  "prompt with the reply; set data.options.chat_template to false.")  # fmt: skip
            prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
            return prompt_ids, tok(whole[len(text) :].rstrip(), add_special_tokens=False)["input_ids"]
        text = "".join(f"{q}\n{a}\n\n" for q, a in demos) + f"{prompt}\n"
        return tok(text)["input_ids"], [*tok(answers[0], add_special_tokens=False)["input_ids"], tok.eos_token_id]

    def collate(self, items: list[tuple]) -> dict[str, Any]:
        """``input_ids``/``attention_mask``/``labels``: prompt and answer, right-padded, labels -100 but on the answer;
        ``prompt_ids``/``prompt_mask``: the prompt alone, left-padded for generation; ``answers``: accepted strings."""
        encoded = [self.encode(*item) for item in items]
        pad = self.tokenizer.pad_token_id
        width = max(len(p) + len(a) for p, a in encoded)
        prompt_width = max(len(p) for p, _ in encoded)
        batch = {name: torch.full((len(items), size), fill, dtype=torch.long) for name, size, fill in (
            ("input_ids", width, pad), ("attention_mask", width, 0), ("labels", width, -100),
            ("prompt_ids", prompt_width, pad), ("prompt_mask", prompt_width, 0))}  # fmt: skip
        for row, (prompt, answer) in enumerate(encoded):
            n, start = len(prompt) + len(answer), prompt_width - len(prompt)
            batch["input_ids"][row, :n] = torch.tensor(prompt + answer)
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, len(prompt) : n] = torch.tensor(answer)
            batch["prompt_ids"][row, start:] = torch.tensor(prompt)
            batch["prompt_mask"][row, start:] = 1
        batch["answers"] = [answers for _, _, answers in items]
        batch["end_ids"] = sorted({a[-1] for _, a in encoded} | {self.tokenizer.eos_token_id})
        return batch

    def items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def answer_nll(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of the answer tokens, and their count."""
        labels = batch["labels"]
        first = int((labels != -100).any(0).nonzero()[0])  # the first column holding an answer token
        keep = labels.shape[1] - first + 1  # logits from the position before it on: the prompts' vocabulary-wide
        # logits would take (batch x prompt x vocabulary) floats, gigabytes for a few-shot batch
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        targets = labels[:, first:]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return nll, (targets != -100).sum()

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        nll, count = self.answer_nll(model, batch)
        return nll / count.clamp(min=1)

    def loss_terms(self, batch: dict[str, Any]) -> int:
        """The answer tokens: a step's loss is the mean over every answer token of its micro-batches and processes."""
        return int((batch["labels"] != -100).sum())

    def start(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        return {"sums": torch.zeros(4, dtype=torch.float64), "hits": []}  # sums: answer NLL, answer tokens, hits, items

    def accumulate(self, state: dict[str, Any], model: nn.Module, batch: dict[str, Any]) -> None:
        nll, count = self.answer_nll(model, batch)
        replies = self.generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["end_ids"])
        pairs = zip(replies, batch["answers"], strict=True)
        hits = [self.extract(reply) in {normalise(a) for a in answers} for reply, answers in pairs]
        state["hits"] += hits
        state["sums"] += torch.tensor([nll.item(), count.item(), sum(hits), len(replies)], dtype=torch.float64)

    def hits(self, state: dict[str, Any]) -> list[bool]:
        return state["hits"]

    def extract(self, reply: str) -> str:
        """The answer a reply gives: the reply itself, or the last match of ``answer_pattern`` (its first group where
        it has one; no match gives no answer), normalised."""
        if self.answer_pattern is None:
            return normalise(reply)
        matches = list(self.answer_pattern.finditer(reply))
        if not matches:
            return ""
        last = matches[-1]
        return normalise(last.group(1) if self.answer_pattern.groups else last.group(0))

    def generate(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, end_ids: list[int]) -> list[str]:
        """Greedy replies to left-padded prompts, decoded without special tokens. A model sharded by FSDP (each
        forward pass a collective) decodes in step with the other processes until all have finished (``synced_gpus``;
        ``transformers`` sets it by itself only for the models it sharded)."""
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
                             eos_token_id=list(end_ids), pad_token_id=self.tokenizer.pad_token_id,
                             synced_gpus=isinstance(model, FSDPModule))  # fmt: skip
        return self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def summarise(self, state: dict[str, Any], reduce: Reduce) -> dict[str, float]:
        nll, tokens, hits, total = reduce(state["sums"]).tolist()
        if total == 0:
            raise DataError("evaluation split is empty")
        loss = nll / max(tokens, 1)
        return {"loss": loss, "exact_match": 100.0 * hits / total, "answer_ppl": float(np.exp(loss))}


def compile_pattern(pattern: Any) -> re.Pattern | None:
    """``data.options.answer_pattern`` compiled; ``None`` scores the whole reply."""
    if pattern is None:
        return None
    problem = "it is not a non-empty string"
    if isinstance(pattern, str) and pattern:
        try:
            return re.compile(pattern)
        except re.error as err:
            problem = str(err)
    raise ConfigError(f"data.options.answer_pattern must be a regular expression or null, got {pattern!r} ({problem}).")


def normalise(answer: str) -> str:
    return answer.strip().lower()
