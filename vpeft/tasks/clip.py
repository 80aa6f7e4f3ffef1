"""Classification with a CLIP model's own text head: zero-shot, few-shot and base-to-novel (the CoOp protocols).

The model (:class:`ClipClassifier`) holds both open_clip towers, ``visual`` and ``text``, and no trained head. Its
classifier is made from text, as CLIP does zero-shot (Radford et al., ICML 2021, Sec. 3.1.4): each class name is put
into every prompt template, the text tower embeds the prompts, the L2-normalised embeddings are averaged over the
templates and normalised again, and the logits are ``exp(logit_scale) * <image embedding, class embedding>`` with
the normalised image embedding. Class names come from the dataset with ``_`` read as a space (CoOp's convention).

Run config (``task: clip_classification``)::

    model:
      name: open_clip:ViT-B-16                    # or open_clip:<path of a JSON open_clip model config>
      pretrained: checkpoints/clip_scenes_tiny.safetensors   # OpenAI's layout or open_clip's
      head: {adapt: both, templates: ["a photo of a {}."]}

``model.head.adapt`` says which tower the run's method adapts: ``image``, ``text`` or ``both`` (default). It is one
adapter whose targets the task scopes with the method's own ``exclude`` option (``text\\..*`` or ``visual\\..*``),
so the core selects, saves and loads the adapter of both towers as one, and the saved ``adapter_config.json`` holds
the exclude that rebuilds it. ``model.head.templates`` are Python format strings with one ``{}``; CoOp's prompt is
``"X X ... X {}."`` with as many ``X`` as context vectors (``configs/clip/``).

Class embeddings: while a text-tower tensor trains they are recomputed in every training forward (the gradient
reaches the text adapter); otherwise they are computed once and kept until the model's mode changes
(``model.train()`` / ``model.eval()``, which every evaluation calls first), so evaluation runs the text tower once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..backbones import load_pretrained
from ..backbones.open_clip import build_clip_model, clip_data_config, clip_tokenizer
from ..data.check import check_image_datasets
from ..errors import ConfigError
from .classification import ClassificationTask, image_datasets

ADAPT = ("image", "text", "both")
# the tower a method must not touch, as a full-match pattern of the core's `exclude` option
OTHER_TOWER = {"image": r"text\..*", "text": r"visual\..*"}
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ClipClassifier(nn.Module):
    """open_clip's two towers with the classifier made from ``prompts`` (C classes x T templates x L tokens)."""

    def __init__(self, clip: nn.Module, prompts: Tensor):
        super().__init__()
        self.visual, self.text, self.logit_scale = clip.visual, clip.text, clip.logit_scale
        if prompts.dim() != 3:
            raise ValueError(f"prompts must be (classes, templates, tokens), got shape {tuple(prompts.shape)}.")
        self.register_buffer("prompts", prompts, persistent=False)
        self._class_embeddings: Tensor | None = None

    def class_embeddings(self) -> Tensor:
        """(C, D): per class, the normalised mean of its templates' normalised text embeddings."""
        classes, templates, length = self.prompts.shape
        text = F.normalize(self.text(self.prompts.reshape(classes * templates, length)).float(), dim=-1)
        return F.normalize(text.reshape(classes, templates, -1).mean(dim=1), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        if self.training and self.text_trains():
            weights = self.class_embeddings()  # the gradient reaches the text tower's trained tensors
        else:
            if self._class_embeddings is None:
                with torch.no_grad():
                    self._class_embeddings = self.class_embeddings()
            weights = self._class_embeddings
        image = F.normalize(self.visual(images).float(), dim=-1)
        return self.logit_scale.exp() * image @ weights.t()

    def text_trains(self) -> bool:
        return any(p.requires_grad for p in self.text.parameters())

    def train(self, mode: bool = True) -> ClipClassifier:
        self._class_embeddings = None  # a mode change may follow a change of the text tower (an adapter, a merge)
        return super().train(mode)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def class_prompts(names: list[str], templates: tuple[str, ...] | list[str]) -> list[list[str]]:
    """Each class name (``_`` read as a space) in every template: ``[[t.format(name) for t in templates], ...]``."""
    return [[t.format(name.replace("_", " ")) for t in templates] for name in names]


def tokenize_prompts(tokenizer: Any, names: list[str], templates: tuple[str, ...] | list[str]) -> Tensor:
    """(classes, templates, context_length) token ids; a prompt longer than the context is refused, not cut."""
    prompts = class_prompts(names, templates)
    flat = [p for per_class in prompts for p in per_class]
    tokens = tokenizer(flat)
    too_long = [flat[i] for i in range(len(flat)) if tokens[i, -1] != 0]  # no padding left: it may have been cut
    if too_long:
        raise ConfigError(
            f"{len(too_long)} prompts do not fit the text tower's {tokens.shape[1]} tokens, e.g. {too_long[0]!r}; "
            "shorten model.head.templates (or the class names)."
        )
    return tokens.reshape(len(names), len(templates), -1)


class ClipClassificationTask(ClassificationTask):
    """Classification by a CLIP model's text head (see the module docstring); loss and metrics as classification."""

    def head_options(self) -> tuple[str, tuple[str, ...]]:
        options = dict(self.cfg.model.head)
        adapt = options.pop("adapt", "both")
        templates = options.pop("templates", DEFAULT_TEMPLATES)
        if options:
            raise ConfigError(f"model.head: clip_classification takes `adapt` and `templates`, got {sorted(options)}.")
        if adapt not in ADAPT:
            raise ConfigError(f"model.head.adapt must be one of {ADAPT}, got {adapt!r}.")
        if isinstance(templates, str):
            templates = (templates,)
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ConfigError(
                f"model.head.templates must be a list of prompt templates, each with one {{}} for the class name "
                f"(e.g. 'a photo of a {{}}.'), got {templates!r}."
            )
        return adapt, tuple(templates)

    def method_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The method's options with the tower ``model.head.adapt`` leaves alone added to its ``exclude``."""
        adapt, _ = self.head_options()
        if adapt == "both":
            return options
        exclude = options.get("exclude", ())
        exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        return {**options, "exclude": (*exclude, OTHER_TOWER[adapt])}

    def build(self) -> tuple[nn.Module, dict[str, Dataset]]:
        cfg = self.cfg
        _, templates = self.head_options()
        family, _, name = cfg.model.name.partition(":")
        if family != "open_clip" or not name:
            raise ConfigError(
                f"model.name {cfg.model.name!r}: clip_classification needs an open_clip model, "
                "'open_clip:<model name>' or 'open_clip:<path of a JSON model config>'."
            )
        unused = {k: v for k, v in (("img_size", cfg.model.img_size), ("kwargs", cfg.model.kwargs)) if v}
        if unused or cfg.model.drop_path or cfg.model.num_classes:
            raise ConfigError(
                f"clip_classification builds the model from its open_clip config: leave model.img_size, model.kwargs,"
                f" model.drop_path and model.num_classes unset (set: {sorted(unused)}); classes come from the data."
            )
        clip = build_clip_model(name)
        data_config = clip_data_config(name)
        datasets = image_datasets(cfg, data_config)
        classes = [str(c) for c in datasets["test"].classes]
        for role, dataset in datasets.items():
            if [str(c) for c in dataset.classes] != classes:
                raise ConfigError(
                    f"data: the {role} split's classes differ from the test split's; the text head is built once "
                    "for one class list (for base-to-novel, run the novel classes as their own evaluation)."
                )
        check_image_datasets(datasets, len(classes), "the test split's classes")
        if cfg.model.pretrained:
            load_pretrained(clip, cfg.model.pretrained, strict=cfg.model.strict)
        prompts = tokenize_prompts(clip_tokenizer(name), classes, templates)
        return ClipClassifier(clip, prompts), datasets


__all__ = ["ADAPT", "ClipClassificationTask", "ClipClassifier", "class_prompts", "tokenize_prompts"]
