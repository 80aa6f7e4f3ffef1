"""Text classification: a language model pooled over its tokens, then a linear head; accuracy and macro-F1 (percent).

``model.name``: an encoder (``minilm``, ``hf:<folder>``) or a decoder (``smollm2``, a ``.gguf`` file, a causal-LM
folder: its base model, without the LM head). ``model.head: {pool: mean|cls|last}`` (default ``mean`` for an encoder,
``last`` for a decoder) then one Linear named ``head``: the method ``linear`` trains exactly it. ``data.name``: a
reader of ``vpeft.data.text`` (``wordnet_supersenses``, ``fortune_topics``) or ``jsonl`` (``<data.root>/<split>.jsonl``
with ``{"text", "label"}`` lines). ``data.options``: ``max_length`` (default: the model's context; a longer text is
an error naming it, never cut silently) and the data's own options (``seed``, ``per_class``; jsonl: ``classes``).

Tokenisation happens in :meth:`TextClassificationTask.collate` (right padding, to the batch's longest text); before
the first step every split is tokenised once and every text over ``max_length`` is named. The confusion matrix is
summed over processes, so macro-F1 is exact under data parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backbones import HFBackbone
from ..backbones.hf import load_language_model
from ..data.text import SOURCE_OPTIONS, TextExample, text_splits
from ..errors import ConfigError, DataError
from ..heads.text import TextClassifier
from .base import Reduce, Task


class TextDataset(Dataset):
    """A list of :class:`~vpeft.data.text.TextExample` and the class names (``classes.json``)."""

    def __init__(self, examples: list[TextExample], classes: list[str] | None = None, lengths: list[int] | None = None):
        self.examples, self.classes = examples, classes
        self.lengths = lengths  # token counts: data.group_by_length groups training batches by them

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TextExample:
        return self.examples[index]


def text_options(cfg: Any, task_keys: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data.options`` split into the task's options (``task_keys`` with their defaults filled in) and the data
    reader's; an unknown key is named as ``data.options.<key>``."""
    known = {**task_keys, **dict.fromkeys(SOURCE_OPTIONS.get(cfg.data.name, ()))}
    unknown = sorted(set(cfg.data.options) - set(known))
    if unknown:
        raise ConfigError(
            f"data.options.{unknown[0]}: unknown option of task {cfg.task} with data {cfg.data.name}"
            f"{f' (also {unknown[1:]})' if unknown[1:] else ''}; valid options: {sorted(known)}."
        )
    options = {**task_keys, **cfg.data.options}
    return {k: options[k] for k in task_keys}, {k: v for k, v in cfg.data.options.items() if k not in task_keys}


def data_splits(cfg: Any, target: str, reader_options: dict[str, Any]) -> tuple[dict[str, list], list[str]]:
    """The examples of the config's splits by role (train, val, test) and the class names."""
    roles = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    roles = {role: split for role, split in roles.items() if split is not None}
    splits = tuple(dict.fromkeys(roles.values()))
    examples, classes = text_splits(cfg.data.name, cfg.data.root, splits, target, **reader_options)
    return {role: examples[split] for role, split in roles.items()}, classes


def context_length(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512)


def check_max_length(max_length: Any, model: nn.Module) -> int:
    context = context_length(model)
    if max_length is None:
        return context
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= context:
        raise ConfigError(f"data.options.max_length must be an integer from 1 to the model's context ({context}), "
                          f"got {max_length!r}.")  # fmt: skip
    return max_length


def too_long(lengths: dict[str, list[int]], max_length: int, what: str) -> None:
    """Name every item (split and index) whose token count is over ``max_length``."""
    over = [(role, i, n) for role, counts in lengths.items() for i, n in enumerate(counts) if n > max_length]
    if over:
        named = ", ".join(f"{role} item {i} ({n} tokens)" for role, i, n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise DataError(
            f"{len(over)} {what} longer than data.options.max_length {max_length}: {named}{more}. Raise "
            "data.options.max_length (up to the model's context) or shorten those items."
        )


class TextClassificationTask(Task):
    metric = "accuracy"

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        head = dict(cfg.model.head)
        pool = head.pop("pool", None)
        if head:
            raise ConfigError(f"model.head: text_classification takes only `pool`, got {sorted(head)}.")
        options, reader_options = text_options(cfg, {"max_length": None})
        examples, classes = data_splits(cfg, "label", reader_options)
        model, self.tokenizer, decoder = load_language_model(cfg.model.name)
        self.tokenizer.padding_side = "right"
        self.max_length = check_max_length(options["max_length"], model)
        encoded = {role: self.tokenizer([e.text for e in items])["input_ids"] for role, items in examples.items()}
        lengths = {role: [len(ids) for ids in seqs] for role, seqs in encoded.items()}
        too_long(lengths, self.max_length, "texts")
        num_classes = self.num_classes = cfg.model.num_classes or len(classes)
        bad = [(role, i) for role, items in examples.items() for i, e in enumerate(items) if e.label >= num_classes]
        if bad:
            raise DataError(f"model.num_classes {num_classes} is fewer than the data's {len(classes)} classes "
                            f"({classes}); e.g. (split, item) {bad[:5]}.")  # fmt: skip
        backbone = HFBackbone(model.base_model if decoder else model)
        classifier = TextClassifier(backbone, num_classes, pool or ("last" if decoder else "mean"))
        datasets = {}  # evaluation sums do not depend on the order: sorted by length, its batches pad little
        for role, items in examples.items():
            order = range(len(items)) if role == "train" else sorted(range(len(items)), key=lengths[role].__getitem__)
            datasets[role] = TextDataset([items[i] for i in order], classes, [lengths[role][i] for i in order])
        return classifier, datasets

    def collate(self, items: list[TextExample]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([e.text for e in items], padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "labels": torch.tensor([e.label for e in items])}  # fmt: skip

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        smoothing = self.cfg.optim.label_smoothing
        return F.cross_entropy(self.logits(model, batch), batch["labels"], label_smoothing=smoothing)

    def start(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        return {"sums": torch.zeros(2, dtype=torch.float64), "confusion": confusion, "hits": []}  # sums: loss, items

    def accumulate(self, state: dict[str, Any], model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        logits, labels = self.logits(model, batch), batch["labels"]
        state["sums"] += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)])
        predicted = logits.argmax(1).cpu()
        state["hits"] += (predicted == labels.cpu()).tolist()
        flat = labels.cpu() * len(state["confusion"]) + predicted  # rows: true class, columns: predicted
        state["confusion"] += torch.bincount(flat, minlength=state["confusion"].numel()).view_as(state["confusion"])

    def hits(self, state: dict[str, Any]) -> list[bool]:
        return state["hits"]

    def summarise(self, state: dict[str, Any], reduce: Reduce) -> dict[str, float]:
        """Loss, accuracy and macro-F1 (percent; a class never true nor predicted counts as F1 0)."""
        loss_sum, total = reduce(state["sums"]).tolist()
        if total == 0:
            raise DataError("evaluation split is empty")
        confusion = reduce(state["confusion"])
        return {"loss": loss_sum / total, "accuracy": 100.0 * confusion.trace().item() / total,
                "macro_f1": 100.0 * macro_f1(confusion)}  # fmt: skip


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean over classes of 2 TP / (2 TP + FP + FN), from a (true, predicted) confusion matrix."""
    hits = confusion.diagonal()
    denominator = confusion.sum(0) + confusion.sum(1)  # 2 TP + FP + FN
    return (2 * hits / denominator.clamp(min=1)).mean().item()
