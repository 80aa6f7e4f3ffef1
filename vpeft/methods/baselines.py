"""The reference points of every PEFT table: linear probing and full fine-tuning, the "Linear" and "Full" rows
of the VTAB-1k and FGVC tables (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119, Table 1), and the
pretrained model as it is, the zero- and few-shot rows of language-model tables.

* ``linear``: the backbone is frozen and only the task head trains (VPT's "Linear" row; 0 parameters besides the
  head). Merging puts the trained head in place of the original.
* ``frozen``: nothing trains, not even a head; a run only evaluates the pretrained model (with k-shot prompts:
  in-context learning, GPT-3's "zero-shot" and "few-shot" rows, Brown et al., NeurIPS 2020, arXiv:2005.14165).
* ``full``: every parameter trains in place (VPT's "Full" row). There is no frozen base to return to, so it cannot be
  disabled or unmerged, and its adapter file holds the whole model. ``modules`` limits it to the parameters of the
  modules it names (roles, suffixes or regexes, as a method's ``targets``; a fused projection trains whole): full
  fine-tuning of chosen weights, as GaLore trains the attention and MLP matrices (``modules: [block]``: the
  transformer blocks; the adapter file then holds only those tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core import AdapterModule, MethodConfig, select_targets


@dataclass
class LinearProbeConfig(MethodConfig):
    pass


class LinearProbe(AdapterModule):
    Config = LinearProbeConfig
    needs_targets = False
    mergeable = True


@dataclass
class FrozenConfig(MethodConfig):
    head: tuple[str, ...] | None = ()  # not even the head trains


class Frozen(AdapterModule):
    Config = FrozenConfig
    needs_targets = False
    trains = False
    mergeable = True


@dataclass
class FullConfig(MethodConfig):
    head: tuple[str, ...] | None = ()  # the head trains in place with everything else
    modules: tuple[str, ...] = ()  # train only these modules' parameters (patterns as targets); () trains everything


class _Whole(AdapterModule):
    """Any module, whole: how ``full`` resolves its ``modules`` with the core's target selection."""

    wraps = ("module",)


class Full(AdapterModule):
    Config = FullConfig
    needs_targets = False
    mergeable = True
    restorable = False

    @classmethod
    def trainable_base(cls, config: FullConfig, model: nn.Module) -> list[str]:
        if not config.modules:
            return [name for name, _ in model.named_parameters()]
        chosen = MethodConfig(targets=config.modules, exclude=config.exclude, head=())
        owned = {id(p) for t in select_targets(model, chosen, _Whole, "full") for p in t.module.parameters()}
        return [name for name, p in model.named_parameters() if id(p) in owned]
