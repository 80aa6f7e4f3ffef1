"""The text tasks end to end on tiny random models saved as local Hugging Face folders with a word-level tokenizer
built offline: loss masks, exact match and perplexity by hand, macro-F1 against scikit-learn, padding sides, resume,
tools/test.py, the frozen reference run, and every bad input named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vpeft.engine import train as engine
from vpeft.engine.config import load_config
from vpeft.errors import ConfigError
from vpeft.heads.text import pool_tokens
from vpeft.tasks import build_task
from vpeft.tasks.text_classification import macro_f1

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>", "[EOT]"]
WORDS = ("what is the base of geese mice ran was went children feet teeth oxen goose mouse run be go child foot tooth "
         "ox red green blue cat dog sky grass sea fish bird tree leaf").split()  # fmt: skip
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [EOT] {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")  # fmt: skip
PAIRS = [("geese", "goose"), ("mice", "mouse"), ("ran", "run"), ("was", "be"), ("went", "go"), ("children", "child"),
         ("feet", "foot"), ("teeth", "tooth"), ("oxen", "ox")]  # fmt: skip


def word_tokenizer(extra: int = 0, chat: bool = True):
    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS, *(f"x{i}" for i in range(extra))])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    model.decoder = tokenizers.decoders.WordPiece()  # joins the words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", extra_special_tokens=["[EOT]"]
    )
    if chat:
        tokenizer.chat_template = CHAT
    return tokenizer


VOCAB = len(SPECIAL) + len(WORDS)


def llama_folder(path: Path, tokenizer=None, save_tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    if save_tokenizer:
        (tokenizer or word_tokenizer()).save_pretrained(path)
    return path


def bert_folder(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    word_tokenizer(chat=False).save_pretrained(path)
    return path


def write_jsonl(root: Path, rows: dict[str, list[dict]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


def lemma_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"what is the base of {PAIRS[(i + offset) % 9][0]}", "answer": PAIRS[(i + offset) % 9][1]}
            for i in range(n)]  # fmt: skip


def label_rows(n: int, offset: int = 0) -> list[dict]:
    colours = ["red", "green", "blue"]
    picks = [(WORDS[20 + (i + offset) % 12], colours[(i + offset) % 3]) for i in range(n)]
    return [{"text": f"the {word} {colour}", "label": colour} for word, colour in picks]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def lemma_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lemmas"), {"train": lemma_rows(12), "val": lemma_rows(4, 3),
                                                         "test": lemma_rows(6, 5)})  # fmt: skip


def causal_config(tmp_path: Path, model: Path, data: Path, *overrides: str):
    path = tmp_path / "causal.yaml"
    path.write_text(f"""
task: causal_lm
model: {{name: "hf:{model}"}}
method: {{name: lora, r: 4}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0, options: {{max_new_tokens: 3}}}}
optim: {{lr: 1.0e-2}}
train: {{epochs: 2, log_every: 1, tensorboard: false, seed: 0}}
""")
    return load_config(path, list(overrides))


def classification_config(tmp_path: Path, model: str, data: Path, *overrides: str):
    path = tmp_path / "text.yaml"
    path.write_text(f"""
task: text_classification
model: {{name: "{model}"}}
method: {{name: lora, r: 4}}
data: {{name: jsonl, root: "{data}", batch_size: 4, num_workers: 0}}
optim: {{lr: 1.0e-2}}
train: {{epochs: 2, log_every: 1, tensorboard: false, seed: 0}}
""")
    return load_config(path, list(overrides))


def built(cfg):
    task = build_task(cfg)
    model, datasets = task.build()
    return task, model, datasets


# ---- causal_lm: masks, padding sides, loss, exact match and perplexity by hand -----------------------------------


def test_labels_mask_the_prompt_and_padding_and_padding_sides(tmp_path, llama_dir, lemma_data):
    task, _, datasets = built(causal_config(tmp_path, llama_dir, lemma_data, "data.options.chat_template=false"))
    tok = word_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batch = task.collate([datasets["train"][0], datasets["train"][5]])  # "... geese" -> goose, "... children" -> child
    prompts = [ids("what is the base of geese"), ids("what is the base of children")]
    answers = [[*ids("goose"), tok.eos_token_id], [*ids("child"), tok.eos_token_id]]
    pad = tok.pad_token_id
    assert len(prompts[0]) == len(prompts[1]) == 6
    for row in range(2):
        n = len(prompts[row]) + len(answers[row])
        assert batch["input_ids"][row, :n].tolist() == prompts[row] + answers[row]
        assert batch["labels"][row].tolist() == [-100] * 6 + answers[row]  # only the answer and its end token
        assert batch["prompt_ids"][row].tolist() == prompts[row]
    # different prompt lengths: the full sequences are right-padded, the prompts left-padded (for generate)
    batch = task.collate([datasets["train"][0], (datasets["train"][0][0], "the base of geese", ("goose",))])
    short = ids("the base of geese")
    assert batch["prompt_ids"][1].tolist() == [pad, pad] + short
    assert batch["prompt_mask"][1].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch["input_ids"][1].tolist() == short + answers[0] + [pad, pad]
    assert batch["labels"][1].tolist() == [-100] * 4 + answers[0] + [-100, -100]
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0, 0]


def test_chat_template_prompt_and_end_of_turn(tmp_path, llama_dir, lemma_data):
    task, _, datasets = built(causal_config(tmp_path, llama_dir, lemma_data))  # auto: the tokenizer has one
    tok = word_tokenizer()
    batch = task.collate([datasets["test"][0]])  # test row 0: PAIRS[5] = children -> child
    ids = batch["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == "<user> what is the base of children [EOT] <assistant> child [EOT]".split()
    assert batch["labels"][0].tolist() == [-100] * 9 + tok.convert_tokens_to_ids(["child", "[EOT]"])
    assert tok.convert_tokens_to_ids("[EOT]") in batch["end_ids"]


def test_loss_is_the_mean_cross_entropy_over_answer_tokens(tmp_path, llama_dir, lemma_data):
    task, model, datasets = built(causal_config(tmp_path, llama_dir, lemma_data))
    items = [datasets["train"][i] for i in range(3)]
    batch = task.collate(items)
    nll, count = 0.0, 0
    for demos, prompt, answers in items:  # one unpadded item at a time
        p, a = task.encode(demos, prompt, answers)
        logp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        nll -= sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(a))
        count += len(a)
    assert task.loss(model, batch).item() == pytest.approx(nll / count, rel=1e-5)


def greedy_replies(folder: Path, prompts: list[str], new_tokens: int = 3) -> list[str]:
    """Each prompt's greedy reply in the chat template, one unpadded item at a time."""
    tok = word_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    replies = []
    for prompt in prompts:
        turn = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[2, 5],
                             pad_token_id=0)  # fmt: skip
        replies.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


def test_exact_match_and_answer_ppl_by_hand(tmp_path, llama_dir):
    """Answers are set to what the model itself generates for half the items (upper-cased), so the batched,
    left-padded generation must reproduce the one-item-at-a-time greedy replies for exact match to be 50%."""
    prompts = [f"what is the base of {w}" for w in ("geese", "oxen the", "mice", "the the went")]
    replies = greedy_replies(llama_dir, prompts)
    assert all(replies)
    answers = [replies[0].upper(), "sky", [replies[2], "fish"], "grass sea"]  # items 0 and 2 match
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    data = write_jsonl(tmp_path / "em", {"train": rows, "val": rows, "test": rows})
    task, model, datasets = built(causal_config(tmp_path, llama_dir, data, "data.eval_batch_size=4"))
    loader = engine._loader(task.cfg, task, datasets["test"], False)
    hits: list[bool] = []
    metrics = task.evaluate(model, loader, torch.device("cpu"), hits=hits)
    assert hits == [True, False, True, False]  # items 0 and 2, in the split's order
    nll, count = 0.0, 0
    for item in datasets["test"]:
        p, a = task.encode(*item)
        logp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        nll -= sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(a))
        count += len(a)
    assert metrics["exact_match"] == 50.0
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["answer_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_answer_pattern_scores_the_last_match_of_each_reply(tmp_path, llama_dir):
    """With ``answer_pattern`` a reply counts when its last match equals an answer: here the replies' last words
    (found by str.split, not by the task's regular expression) are the answers of two items in four."""
    prompts = [f"what is the base of {w}" for w in ("geese", "oxen the", "mice", "the the went")]
    replies = greedy_replies(llama_dir, prompts, new_tokens=4)
    last_words = [r.split()[-1] for r in replies]
    assert any(len(r.split()) > 1 for r in replies[:2])  # a whole-reply comparison would miss those
    answers = [last_words[0], last_words[1], "sky", "grass"]
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    data = write_jsonl(tmp_path / "em", {"train": rows, "val": rows, "test": rows})
    expected = 100.0 * sum(w == a for w, a in zip(last_words, answers, strict=True)) / 4
    scores = {}
    for pattern in (r"[a-z]+", r"(\w+)\W*$", None):
        cfg = causal_config(tmp_path, llama_dir, data, "data.eval_batch_size=4", "data.options.max_new_tokens=4",
                            f"data.options.answer_pattern={json.dumps(pattern)}")  # fmt: skip
        task, model, datasets = built(cfg)
        loader = engine._loader(task.cfg, task, datasets["test"], False)
        scores[pattern] = task.evaluate(model, loader, torch.device("cpu"))["exact_match"]
    whole = 100.0 * sum(r.strip() == a for r, a in zip(replies, answers, strict=True)) / 4
    assert scores == {r"[a-z]+": expected, r"(\w+)\W*$": expected, None: whole} and expected == 50.0 > whole


@pytest.mark.parametrize(("key", "value", "phrase"), [
    ("answer_pattern", "'(unclosed'", "answer_pattern must be a regular expression"),
    ("answer_pattern", "''", "answer_pattern must be a regular expression"),
    ("max_new_tokens", "-1", "max_new_tokens must be a positive integer"),
])  # fmt: skip
def test_bad_scoring_options_are_refused(tmp_path, llama_dir, lemma_data, key, value, phrase):
    with pytest.raises(ConfigError, match=phrase):
        built(causal_config(tmp_path, llama_dir, lemma_data, f"data.options.{key}={value}"))


def test_k_shot_demonstrations_come_from_train_fixed_per_item(tmp_path, llama_dir, lemma_data):
    cfg = causal_config(tmp_path, llama_dir, lemma_data, "data.options.shots=3")
    task, _, datasets = built(cfg)
    train_prompts = {datasets["train"].format(e.text): e.answers[0] for e in datasets["train"].examples}
    for role in ("train", "test"):
        for i in range(len(datasets[role])):
            demos, prompt, _ = datasets[role][i]
            assert len(demos) == 3 and datasets[role][i] == (demos, prompt, datasets[role][i][2])
            assert all(train_prompts[q] == a for q, a in demos)
            assert demos == built(cfg)[2][role][i][0]  # the same demonstrations in a rebuilt run
    assert len({tuple(datasets["test"][i][0]) for i in range(6)}) > 1  # drawn per item


# ---- text_classification: pooling, macro-F1 against scikit-learn ------------------------------------------------


def test_pooling_by_hand_with_either_padding_side():
    hidden = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_tokens(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(pool_tokens(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    torch.testing.assert_close(pool_tokens(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, right, "cls"), hidden[:, 0])


def test_macro_f1_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    pred[pred == 4] = 3  # class 4 is never predicted: its F1 is 0 and still averaged
    confusion = torch.zeros(5, 5, dtype=torch.float64).index_put_((true, pred), torch.ones(200, dtype=torch.float64),
                                                                  accumulate=True)  # fmt: skip
    expected = metrics.f1_score(true.numpy(), pred.numpy(), average="macro", labels=list(range(5)), zero_division=0)
    assert macro_f1(confusion) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_text_classification_metrics_against_the_model_and_scikit_learn(tmp_path, family):
    metrics = pytest.importorskip("sklearn.metrics")
    folder = bert_folder(tmp_path / "bert") if family == "bert" else llama_folder(tmp_path / "llama")
    data = write_jsonl(tmp_path / "d", {"train": label_rows(12), "val": label_rows(6, 1), "test": label_rows(10, 2)})
    task, model, datasets = built(classification_config(tmp_path, f"hf:{folder}", data))
    assert model.pool == ("mean" if family == "bert" else "last")
    assert datasets["train"].classes == ["blue", "green", "red"]
    loader = engine._loader(task.cfg, task, datasets["test"], False)
    hits: list[bool] = []
    out = task.evaluate(model, loader, torch.device("cpu"), hits=hits)
    tok = word_tokenizer(chat=False)
    inner = model.eval().backbone.model
    preds, labels, loss = [], [], 0.0
    for example in datasets["test"]:  # one unpadded text at a time, through the HF model and a hand pool
        ids = torch.tensor([tok(example.text)["input_ids"]])
        hidden = inner(input_ids=ids).last_hidden_state[0]
        logits = model.head(hidden.mean(0) if family == "bert" else hidden[-1])
        preds.append(logits.argmax().item())
        labels.append(example.label)
        loss -= logits.log_softmax(-1)[example.label].item()
    assert out["accuracy"] == pytest.approx(100 * metrics.accuracy_score(labels, preds))
    assert hits == [p == y for p, y in zip(preds, labels, strict=True)]  # per item, in the split's order
    expected_f1 = metrics.f1_score(labels, preds, average="macro", labels=[0, 1, 2], zero_division=0)
    assert out["macro_f1"] == pytest.approx(100 * expected_f1)
    assert out["loss"] == pytest.approx(loss / len(labels), rel=1e-4)
