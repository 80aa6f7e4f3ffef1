"""The harness end to end on a text task: a tiny BERT folder and a word-level tokenizer written here, jsonl data
whose label is the first word, a written-out suite with a linear-probe baseline, LoRA under ``quick``."""

from __future__ import annotations

import json

import pytest
import yaml
from vbench.runner import check_result, collect

from tests.bench._helpers import load_script

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
run_tool = load_script("V-PEFT-Bench/run.py")
WORDS = ["red", "green", "blue", "one", "two", "three", "four", "cat", "dog"]


def tiny_bert_folder(folder):
    """A 2-layer, 32-wide BERT and its word-level tokenizer, saved as a local model folder."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(folder, sizes):
    """Label = the colour that starts the text; the rest are filler words."""
    folder.mkdir(parents=True)
    for split, count in sizes.items():
        lines = [{"text": f"{WORDS[i % 3]} {WORDS[3 + i % 4]} {WORDS[7 + i % 2]}", "label": WORDS[i % 3]}
                 for i in range(count)]  # fmt: skip
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_and_the_linear_baseline_run_on_a_tiny_text_task(tmp_path):
    model = tiny_bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "data", {"train": 24, "val": 6, "test": 9})
    recipe = {
        "task": "text_classification",
        "model": {"name": f"hf:{model}"},
        "data": {"name": "jsonl", "root": str(data), "batch_size": 8, "num_workers": 0},
        "optim": {"lr": 1e-2},
        "train": {"epochs": 2, "seed": 0, "tensorboard": False},
    }
    (tmp_path / "colours.yaml").write_text(yaml.safe_dump(recipe))
    suite = {
        "tasks": {"colours": {"recipe": "colours.yaml", "metric": "accuracy", "group": "text"}},
        "seeds": [0, 1],
        "baselines": {"linear": {}},
        "check": {"method": "lora", "sigmas": 3},
        "protocols": {"quick": {"final": ["train", "test"]}},
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    args = ["--suite", str(tmp_path / "suite.yaml"), "--methods", "lora", "--seeds", "1", "--protocol", "quick",
            "--out", str(out)]  # fmt: skip
    assert run_tool.main(args) == 0
    records = {r["method"]: r for r in collect(out)}
    assert set(records) == {"lora", "linear"} and all(check_result(r) == [] for r in records.values())
    lora, linear = records["lora"], records["linear"]
    assert lora["metric"] == "accuracy" and lora["test_size"] == 9 and lora["eval_split"] == "test"
    assert set(lora["test_metrics"]) >= {"accuracy", "macro_f1", "loss"}
    assert lora["accuracy"] * 9 / 100 == pytest.approx(round(lora["accuracy"] * 9 / 100))  # hits out of 9 items
    assert lora["trainable_params"] == 2 * 2 * 8 * (32 + 32)  # r=8 on q and v of two layers; the head apart
    assert linear["trainable_params"] == 0 and linear["baseline"] and not lora["baseline"]
    assert lora["config"]["data"]["train_split"] == "train" and lora["config"]["data"]["val_split"] is None
    board = (out / "leaderboard" / "leaderboard.md").read_text()
    assert "`linear` (baseline)" in board and "Check (quick)" in board
