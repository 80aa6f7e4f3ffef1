"""The CLIP task: the text head against CLIP's own recipe, tower scoping, the class-embedding cache, saved adapters."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones import load_pretrained
from vpeft.backbones.open_clip import build_clip_model, clip_tokenizer
from vpeft.core import adapter_record
from vpeft.errors import ConfigError
from vpeft.tasks.clip import ClipClassificationTask, class_prompts, tokenize_prompts

from .conftest import NAMES, TEMPLATES, TINY, tiny_classifier


def test_logits_are_clips_zero_shot_classifier(tiny_config, clip_images):
    model = tiny_classifier(tiny_config)
    tokenizer = clip_tokenizer(tiny_config)
    weights = []
    for name in ["red circle", "blue square", "green cross"]:  # "_" is read as a space
        per_template = [F.normalize(model.text(tokenizer([t.format(name)])), dim=-1)[0] for t in TEMPLATES]
        mean = torch.stack(per_template).mean(dim=0)
        weights.append(mean / mean.norm())
    image = model.visual(clip_images)
    image = image / image.norm(dim=-1, keepdim=True)
    expected = model.logit_scale.exp() * image @ torch.stack(weights).t()
    torch.testing.assert_close(model(clip_images), expected, rtol=1e-5, atol=1e-5)
    assert class_prompts(["green_cross"], TEMPLATES) == [["a photo of a green cross.", "a green cross on the left."]]


def _task(adapt: str | None = None, templates=None) -> ClipClassificationTask:
    head = {k: v for k, v in (("adapt", adapt), ("templates", templates)) if v is not None}
    return ClipClassificationTask(SimpleNamespace(model=SimpleNamespace(head=head)))


@pytest.mark.parametrize(("adapt", "towers"), [("image", {"visual"}), ("text", {"text"}), ("both", {"visual", "text"})])
def test_adapt_scopes_the_method_to_its_towers(tiny_config, adapt, towers):
    model = tiny_classifier(tiny_config)
    options = _task(adapt).method_options({"r": 4})
    vpeft.apply_method(model, "lora", **options)
    targets = adapter_record(model).targets
    assert {name.split(".")[0] for name in targets} == towers
    assert len(targets) == 4 * len(towers)  # q and v of 2 blocks per tower


def test_adapt_keeps_the_users_exclude():
    options = _task("image").method_options({"exclude": ["visual.transformer.resblocks.0.attn"]})
    assert options["exclude"] == ("visual.transformer.resblocks.0.attn", r"text\..*")


@pytest.mark.parametrize(
    ("head", "match"),
    [({"adapt": "towers"}, "adapt must be one of"), ({"templates": ["a photo"]}, "one {}"), ({"pool": "avg"}, "takes")],
)
def test_head_options_are_checked(head, match):
    task = ClipClassificationTask(SimpleNamespace(model=SimpleNamespace(head=head)))
    with pytest.raises(ConfigError, match=match):
        task.head_options()


def test_a_prompt_longer_than_the_context_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="do not fit the text tower's 24 tokens"):
        tokenize_prompts(clip_tokenizer(tiny_config), ["red circle"], ("a " * 30 + "{}",))


def test_text_adapter_trains_and_evaluation_embeds_the_classes_once(tiny_config, clip_images):
    model = tiny_classifier(tiny_config)
    vpeft.apply_method(model, "lora", r=4)
    calls = []
    model.text.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    F.cross_entropy(model(clip_images), torch.tensor([0, 1, 2])).backward()
    text_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")]
    assert text_grads and all(g is not None for g in text_grads)
    model(clip_images)
    assert len(calls) == 2  # recomputed in every training forward
    model.eval()
    with torch.no_grad():
        first = model(clip_images)
        second = model(clip_images)
    assert len(calls) == 3  # once for the evaluation
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_image_only_adaptation_embeds_the_classes_once_in_training(tiny_config, clip_images):
    model = tiny_classifier(tiny_config)
    vpeft.apply_method(model, "lora", **_task("image").method_options({}))
    calls = []
    model.text.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    for _ in range(3):
        model(clip_images).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["lora", "comp_lora"])
def test_adapter_of_both_towers_saves_and_loads(tiny_config, clip_images, tmp_path, method):
    base = tiny_classifier(tiny_config)
    model = copy.deepcopy(base)
    vpeft.apply_method(model, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    vpeft.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    vpeft.load_adapter(fresh, tmp_path / "adapter")
    expected = model(clip_images)
    torch.testing.assert_close(fresh.eval()(clip_images), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, base(clip_images))
    vpeft.merge(model)
    model.eval()
    torch.testing.assert_close(model(clip_images), expected, rtol=1e-5, atol=1e-5)


def test_openai_layout_checkpoint_loads_into_both_towers(tiny_config, tmp_path, clip_images):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(3)
    reference = open_clip.CLIP(**TINY).eval()  # OpenAI's layout: text tensors at the top level
    torch.save(reference.state_dict(), tmp_path / "openai.pt")
    model = build_clip_model(tiny_config).eval()
    load_pretrained(model, tmp_path / "openai.pt")
    tokens = clip_tokenizer(tiny_config)(["a photo of a red circle."])
    torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), rtol=0, atol=0)
    torch.testing.assert_close(model.encode_image(clip_images), reference.encode_image(clip_images), rtol=0, atol=0)


def test_names_and_templates_order(tiny_config):
    tokens = tokenize_prompts(clip_tokenizer(tiny_config), NAMES, TEMPLATES)
    assert tokens.shape == (3, 2, 24)
    assert torch.equal(tokens[1, 1], clip_tokenizer(tiny_config)(["a blue square on the left."])[0])
