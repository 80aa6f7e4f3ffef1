"""The mechanics every method shares: the per-target adapter base class and the wrappers that compose it.

A method is one :class:`AdapterModule` subclass: its ``Config`` and its math. Where it composes with the model lives
here, once:

* :class:`Adapted` replaces a target module and holds it as ``base_layer``. For the active adapter it computes
  ``y = base_layer(adapt_input(x))`` and then ``adapt_output(x, y)``, ``x`` being the first argument, by position or
  by name (transformers' decoder layers call their attention with ``hidden_states=``); on a fused projection
  (``attn.qkv``) each adapted slice gets its own module and only its columns of ``y`` change, so the other slices
  stay bit-identical.
  The adapted slices of one projection are handed to one call, ``AdapterModule.adapt_slices``: by default it runs
  each slice's ``adapt_output`` on its columns; a method may override it to compute all slices at once.
* :class:`AdaptedMHA` does the same for ``nn.MultiheadAttention``, whose projections are applied inside one functional
  call; it feeds that call the adapters' ``merged`` weights, so only weight-space methods can target it.
* :class:`HeadCopies` gives every adapter its own trainable copy of the task head.

A **replaced base** (quantised-base methods: PEQA, L4Q, SketchTune, HALO). A module with ``replaces_base`` computes
the wrapped Linear's output itself, ``base_forward(x)`` (bias included), from its own representation of the weight
(packed integers with scales, a sketch with codebooks, a fake-quantised merge, a low-precision matmul), and
``adapt_output`` then runs as for any method. It covers a whole Linear (or HF Conv1D), never a slice. What the
adapter operations mean for it:

* ``releases_base`` (PEQA, SketchTune): the module holds the only copy of the frozen weight. When the adapter is
  added, the layer's full-precision ``weight`` is freed (an empty placeholder of its dtype and device takes its
  place; the bias stays), so the model really holds the packed form; such an adapter is the only one on its model.
  ``disabled()`` then runs ``base_forward(x, initial=True)``: the quantised base with its quantisation state as
  first built (PEQA's round-to-nearest scales, SketchTune's first codebooks), i.e. the frozen quantised model, since
  the full-precision one is gone. ``delete_adapter`` leaves that quantised base in the layer as a plain weight.
* Without ``releases_base`` (L4Q, HALO) the layer keeps its weight and ``disabled()`` runs it: the original model,
  exactly.
* ``merge()`` writes ``effective_weight()``, the weight ``base_forward`` stands for with the trained state folded in
  (dequantised), into the layer as a new tensor, and keeps the tensor it replaces (the placeholder, or W0) aside;
  ``unmerge()`` puts that tensor back, bit for bit, and the adapter runs again. A merge is the export to a plain
  full-precision model; ``save_adapter`` saves the trainable quantisation state only (the packed codes are rebuilt
  from the full-precision weights at load, deterministically).

A **replaced call** (MEFT's reversible encoder). A module with ``replaces_call`` computes a whole wrapped module's
call itself, ``call(x, *args, **kwargs)`` with the call's own arguments, running the base module's sub-modules in an
order or a form of its own (couplings whose backward pass recomputes activations); the base weights are not touched,
so ``disabled()`` runs the base module as it was.

A shared :class:`Switch` says which adapter is active and whether all are disabled, so switching costs nothing.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MethodConfig
from .modules import WHOLE, Target, is_conv1d, weight_and_bias


@dataclass(frozen=True)
class Prepared:
    """What :meth:`AdapterModule.prepare` may return instead of a bare config: the decided ``config`` and
    ``per_target``, target key (``Target.key``) -> the state its layer starts from, handed over as ``Target.init``."""

    config: MethodConfig
    per_target: dict[str, Any] = field(default_factory=dict)


@dataclass
class Switch:
    """Shared by every wrapper of one model: the active adapter, and whether adapters are bypassed."""

    active: str | None = None
    disabled: bool = False


class AdapterModule(nn.Module):
    """One adapter's tensors for one target: a whole module, or one slice (``q``/``k``/``v``) of a fused projection.

    Subclasses set the class attributes and override what their math needs:

    * ``adapt_output(x, y)``: the output given the target's input ``x`` and base output ``y`` (LoRA, SSF, adapters);
    * ``adapt_input(x)``: the input the base layer sees (RepAdapter, prompts);
    * ``adapt_slices(x, y, parts, slices)`` (class method): all adapted slices of one fused projection in one call;
      by default ``adapt_output`` per slice, on its columns;
    * ``delta_weight()`` (additive methods) or ``merged``/``unmerged`` (the others) to fold into the base weights.

    Method-level hooks are class methods: ``prepare`` (data-dependent choices from calibration batches),
    ``restructure`` (the base model at a structure the config records: physical pruning),
    ``build_shared`` (tensors shared by all targets, FacT), ``loss`` (regularisers), ``on_step`` (schedules) and
    ``control`` (controllers that change the trainable set: vpeft/core/control.py).
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    wraps: ClassVar[tuple[str, ...]] = ("linear",)  # target kinds: linear, conv2d, norm, mha, module
    mergeable: ClassVar[bool] = False  # can fold into the base weights (merged/unmerged are defined)
    identity_at_init: ClassVar[bool] = True  # the adapted model equals the base model before training
    restorable: ClassVar[bool] = True  # the base model survives (False for methods that train base tensors)
    needs_targets: ClassVar[bool] = True  # False for methods that only train the head or base tensors
    needs_calibration: ClassVar[bool] = False  # prepare() needs data batches
    trains: ClassVar[bool] = True  # False for a reference point that evaluates the model as it is (frozen)
    no_weight_decay: ClassVar[tuple[str, ...]] = ()  # own parameter names kept out of weight decay (prompt tokens)
    # The LoRA family: "lora" when each module is a low-rank update y + scale * B A dropout(x) that ``lora_factors()``
    # returns as (A (r, in[, kh, kw]), B (out, r), scale), with a ``dropout``; "dora" when it is DoRA's decomposition
    # of one (plus ``magnitude``). Converters to LoRA file formats (vpeft.interop) export what declares a variant, so a
    # subclass of LoRA exports as LoRA unless its math differs, in which case it declares its own variant or None.
    lora_variant: ClassVar[str | None] = None
    # Virtual tokens (prompt and prefix tuning, vpeft/core/virtual.py): a module on the model's input embedding that
    # adds tokens the input lacks, "embeddings" (``virtual_embeddings``) or per-layer keys and values ("cache",
    # ``virtual_cache``); the model's call is rewritten around it. Its instances set ``num_virtual_tokens``.
    virtual: ClassVar[str | None] = None
    num_virtual_tokens: int = 0
    # A replaced base (see the module docstring): ``base_forward`` computes the layer's output, ``effective_weight``
    # is what merge writes; with ``releases_base`` the layer's own weight is freed and the module holds the only copy.
    replaces_base: ClassVar[bool] = False
    releases_base: ClassVar[bool] = False
    # A replaced call (see the module docstring): ``call(x, *args, **kwargs)`` is the wrapped module's whole output.
    replaces_call: ClassVar[bool] = False

    def __init__(self, target: Target, config: MethodConfig, shared: nn.Module | None = None):
        super().__init__()
        self.__dict__["shared"] = shared  # not registered: it is saved once, under vpeft_shared, not per target

    # ---- math, per target --------------------------------------------------------------------------------------
    def adapt_input(self, x: Tensor) -> Tensor:
        return x

    def adapt_output(self, x: Tensor, y: Tensor) -> Tensor:
        return y

    def delta_weight(self) -> Tensor:
        """``W_merged - W`` in the layout of the base weight (or slice): ``(out, in)`` or ``(out, in/g, kh, kw)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no weight delta")

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The base weight and bias with this adapter folded in (out of place, differentiable)."""
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`merged`."""
        return weight - self.delta_weight().to(weight.dtype), bias

    @classmethod
    def adapt_slices(cls, x: Tensor, y: Tensor, parts: dict[str, AdapterModule], slices: dict[str, slice]) -> Tensor:
        """The output of a fused projection (``attn.qkv``) from its input ``x``, its base output ``y`` (``(..., out)``)
        and the adapters of its adapted slices, ``parts`` (part -> module; all of one adapter, so of one class).
        ``slices`` maps every part of the projection, adapted or not, to its output columns, in column order.

        By default each adapter changes only its own columns, through ``adapt_output`` on that chunk. A method may
        override this to compute all its slices in one go (LoRA: one stacked A matmul, one dropout mask on ``x``);
        an override must leave the columns of the slices not in ``parts`` bit-identical to ``y``.
        """
        chunks = list(y.split([s.stop - s.start for s in slices.values()], dim=-1))
        for i, part in enumerate(slices):
            if part in parts:
                chunks[i] = parts[part].adapt_output(x, chunks[i])
        return torch.cat(chunks, dim=-1)

    def base_forward(self, x: Tensor, initial: bool = False) -> Tensor:
        """The wrapped layer's output, bias included, from this module's own weight (``replaces_base``); with
        ``initial``, from the quantisation state as first built (what ``disabled()`` runs for a released base)."""
        raise NotImplementedError(f"{type(self).__name__} does not replace its base layer")

    def call(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output for a call with input ``x`` and its other arguments (``replaces_call``)."""
        raise NotImplementedError(f"{type(self).__name__} does not replace its module's call")

    def effective_weight(self, initial: bool = False) -> Tensor:
        """``(out, in)``: the weight :meth:`base_forward` computes with, dequantised (what merge writes)."""
        raise NotImplementedError(f"{type(self).__name__} does not replace its base layer")

    def virtual_embeddings(self, batch: int) -> Tensor:
        """``(batch, p, D)`` embeddings prepended to the input's (``virtual = "embeddings"``)."""
        raise NotImplementedError(f"{type(self).__name__} adds no virtual embeddings")

    def virtual_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """One ``(key, value)`` pair of ``(batch, kv_heads, p, head_dim)`` per attention layer, in layer order,
        put into the model's key/value cache before the input (``virtual = "cache"``)."""
        raise NotImplementedError(f"{type(self).__name__} adds no virtual keys and values")

    # ---- hooks, per method -------------------------------------------------------------------------------------
    @classmethod
    def accepts(cls, target: Target, config: MethodConfig) -> bool:
        """Whether a matched module is really a target (BitFit skips layers without a bias)."""
        return True

    @classmethod
    def prepare(
        cls, config: MethodConfig, model: nn.Module, targets: list[Target], calibration: Any
    ) -> MethodConfig | Prepared:
        """Decisions that need the whole model or data (``calibration``: batches, or None when the method does not
        need them), returned as a new config (``dataclasses.replace``) so that a saved adapter rebuilds from its
        config alone: SPT's allocation plan, a token grid read from ``model.patch_embed``. Must not change the model.

        Per-target tensors that are too big for a config (SPT's sparse indices, CorDA's decomposition, LoRA-GA's
        gradient) are returned as ``Prepared(config, per_target={target.key: value})``: each value reaches that
        target's constructor as ``target.init`` (None for a target without one). They are not saved with the config,
        so the constructor must also build from ``target.init is None`` (a load: placeholders of the right shape,
        which the saved tensors then fill). The calibration service (:mod:`vpeft.core.calibration`) computes the
        usual statistics from ``calibration``.
        """
        return config

    @classmethod
    def restructure(cls, config: MethodConfig, model: nn.Module) -> None:
        """Bring the base model to the structure ``config`` records, before targets are selected (Light-PEFT's
        physically pruned heads and neurons); called each time the adapter is added: applied, rebuilt at a
        controller's new shapes (``--resume``) or loaded from a file. It must be a no-op on a model that already has
        that structure, and refuse (a :class:`~vpeft.errors.UserError`) before changing anything on a model it cannot
        restructure. Only a method that is not ``restorable`` may change the model here."""

    @classmethod
    def build_shared(cls, config: MethodConfig, targets: list[Target]) -> nn.Module | None:
        return None

    @classmethod
    def trainable_base(cls, config: MethodConfig, model: nn.Module) -> list[str]:
        """Names of base parameters this method trains in place (``full``); they are saved with the adapter."""
        return []

    @classmethod
    def lr_multipliers(cls, config: MethodConfig) -> dict[str, float]:
        """Learning-rate multipliers of this method's own parameters, by parameter name (``{"lora_B": 16.0}`` for
        LoRA+'s faster B): the optimiser puts them in parameter groups of their own; a name not listed trains at the
        run's learning rate."""
        return {}

    @classmethod
    def loss(
        cls, config: MethodConfig, layers: list[AdapterModule], shared: nn.Module | None, context: Any = None
    ) -> Tensor | None:
        """An extra loss term added to the task loss during training, or None.

        ``context`` is the step's :class:`vpeft.core.plugins.LossContext` (the model, the batch, the model's outputs);
        an override that does not name a ``context`` parameter is called without it (regularisers of the method's own
        tensors need only ``layers`` and ``shared``)."""
        return None

    @classmethod
    def on_step(
        cls, config: MethodConfig, layers: list[AdapterModule], step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        """Called by the training loop before each optimizer step (rank schedules; annealed weight decay edits the
        ``optimizer``'s param groups)."""

    @classmethod
    def control(cls, config: MethodConfig, layers: list[AdapterModule], ctx: Any) -> str | None:
        """Called by the training loop at the start of each optimizer step, before its forward passes, with a
        :class:`~vpeft.core.control.StepContext` (model, step, batch, loss, validation batches): a controller freezes,
        unfreezes, prunes or grows tensors here and returns a line saying what changed (None: nothing)."""
        return None


class Adapted(nn.Module):
    """A target module with its adapters: ``adapters[adapter_name][part]``."""

    def __init__(self, base_layer: nn.Module, switch: Switch, slices: dict[str, slice] | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.slices = slices or {}  # part -> columns of the output (fused projections only)
        self._switch = switch

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # code that reads ``layer.weight`` or ``layer.in_features`` keeps working
            return getattr(super().__getattr__("base_layer"), name)

    def active_parts(self) -> nn.ModuleDict | None:
        sw = self._switch
        if sw.disabled or sw.active is None or sw.active not in self.adapters:
            return None
        return self.adapters[sw.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parts = self.active_parts()
        released = self.__dict__.get("released")  # the module holding this layer's only weight (releases_base)
        if parts is None and released is None:
            return self.base_layer(*args, **kwargs)
        # the input is the first argument, passed by position or, as transformers' decoder layers call their
        # attention (``self_attn(hidden_states=...)``), by the name of the base module's first forward parameter
        key = None if args else self._input_name()
        x, args = (args[0], args[1:]) if key is None else (kwargs.pop(key), args)
        if parts is None:  # disabled, or another adapter active: the released base as first built
            return released.base_forward(x, initial=True)
        whole = parts[WHOLE] if WHOLE in parts else None
        x_in = whole.adapt_input(x) if whole is not None else x
        if whole is not None and whole.replaces_base:
            out = whole.base_forward(x_in)
        elif whole is not None and whole.replaces_call:
            out = whole.call(x_in, *args, **kwargs)
        elif key is None:
            out = self.base_layer(x_in, *args, **kwargs)
        else:
            out = self.base_layer(*args, **{key: x_in}, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # HF layers return (hidden, extras...)
        if whole is not None:
            y = whole.adapt_output(x, y)
        sliced = {part: parts[part] for part in self.slices if part in parts}
        if sliced:  # one call for all adapted slices: a method may compute them together (LoRA: one A matmul)
            y = type(next(iter(sliced.values()))).adapt_slices(x, y, sliced, self.slices)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def _input_name(self) -> str:
        """The name of the base module's first forward parameter (``hidden_states``), for calls by keyword."""
        name = self.__dict__.get("_input")
        if name is None:
            name = next(iter(inspect.signature(self.base_layer.forward).parameters))
            self.__dict__["_input"] = name
        return name

    # ---- weights, as (out, in, ...) views that merge writes through ---------------------------------------------
    def weight_views(self, part: str) -> tuple[Tensor, Tensor | None]:
        return weight_and_bias(self.base_layer, self.slices[part] if part != WHOLE else None)

    @torch.no_grad()
    def fold(self, name: str, undo: bool = False) -> None:
        """Merge (or with ``undo``, unmerge) adapter ``name`` into the base weights in place.

        Every new value is computed before any is written, so a failure leaves the weights as they were. A replaced
        base (``replaces_base``) swaps tensors instead: merge puts its ``effective_weight()`` in as the layer's weight
        and keeps the one it replaces, which unmerge puts back.
        """
        replaced = [m for m in self.adapters[name].values() if m.replaces_base]
        if replaced:
            if undo:
                self._set_weight(self.__dict__.pop("kept_weight"))
            else:
                kept = self._set_weight(replaced[0].effective_weight())
                self.__dict__["kept_weight"] = kept
            return
        updates = []
        for part, module in self.adapters[name].items():
            weight, bias = self.weight_views(part)
            new_w, new_b = (module.unmerged if undo else module.merged)(weight, bias)
            if new_b is not None and bias is None:
                raise ValueError(f"cannot merge a bias into {type(self.base_layer).__name__} without a bias")
            updates.append((weight, new_w, bias, new_b))
        for weight, new_w, bias, new_b in updates:
            weight.copy_(new_w)
            if new_b is not None:
                bias.copy_(new_b)

    def release(self, module: AdapterModule) -> None:
        """Free the layer's full-precision weight: ``module`` (``releases_base``) holds the only copy from now on."""
        self.__dict__["released"] = module
        weight = self.base_layer.weight
        self.__dict__["released_numel"] = weight.numel()
        self.base_layer.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)

    def restore(self) -> None:
        """Undo :meth:`release` as far as it can be undone: the layer gets the quantised base as first built."""
        module = self.__dict__.pop("released")
        self.__dict__.pop("released_numel")
        with torch.no_grad():
            self._set_weight(module.effective_weight(initial=True))

    def _set_weight(self, weight: Tensor | nn.Parameter) -> nn.Parameter:
        """Make ``weight`` the layer's weight, ``(out, in)`` (stored transposed in an HF Conv1D) or a Parameter as
        the layer stores it; returns the Parameter it replaces."""
        old = self.base_layer.weight
        if not isinstance(weight, nn.Parameter):
            weight = weight.detach().to(old.dtype)
            weight = nn.Parameter((weight.T if is_conv1d(self.base_layer) else weight).contiguous(), False)
        self.base_layer.weight = weight
        return old


class AdaptedMHA(Adapted):
    """``nn.MultiheadAttention`` with weight-space adapters on its ``q``/``k``/``v`` in-projection and ``out_proj``."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        mha = self.base_layer
        parts = self.active_parts()
        options = dict(
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if parts is None:
            return mha(query, key, value, **options)
        whole = parts[WHOLE] if WHOLE in parts else None  # module-level adapters (parallel, sequential)
        x = query
        if whole is not None:
            self_attention = key is query and value is query
            query = whole.adapt_input(query)
            key, value = (query, query) if self_attention else (key, value)
        if len(parts) > (whole is not None):
            out, weights = self._attention_with_merged_weights(parts, query, key, value, **options)
        else:
            out, weights = mha(query, key, value, **options)
        return (whole.adapt_output(x, out) if whole is not None else out), weights

    def _attention_with_merged_weights(
        self, parts: nn.ModuleDict, query: Tensor, key: Tensor, value: Tensor, **options: Any
    ) -> tuple[Tensor, Tensor | None]:
        mha = self.base_layer
        in_w, in_b = [], []
        for part in ("q", "k", "v"):
            w, b = self.weight_views(part)
            if part in parts:
                w, b = parts[part].merged(w, b)
            in_w.append(w), in_b.append(b)
        out_w, out_b = self.weight_views("out_proj")
        if "out_proj" in parts:
            out_w, out_b = parts["out_proj"].merged(out_w, out_b)
        if mha.batch_first:  # the functional form takes (seq, batch, dim)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            torch.cat(in_w),
            torch.cat(in_b) if in_b[0] is not None else None,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            out_w,
            out_b,
            training=mha.training,
            **options,
        )
        return (out.transpose(0, 1) if mha.batch_first else out), weights

    def weight_views(self, part: str) -> tuple[Tensor, Tensor | None]:
        mha = self.base_layer
        if part == "out_proj":
            return mha.out_proj.weight, mha.out_proj.bias
        cols = self.slices[part]
        bias = mha.in_proj_bias[cols] if mha.in_proj_bias is not None else None
        return mha.in_proj_weight[cols], bias


class HeadCopies(Adapted):
    """A task head with one trainable copy per adapter; disabled or inactive, the original head answers."""

    def add_copy(self, name: str) -> None:
        head = copy.deepcopy(self.base_layer)
        head.requires_grad_(True)
        self.adapters[name] = nn.ModuleDict({WHOLE: head})

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        parts = self.active_parts()
        head = parts[WHOLE] if parts is not None else self.base_layer
        return head(x, *args, **kwargs)


@dataclass
class AdapterRecord:
    """What one named adapter is: enough to save it and to rebuild it."""

    method: str
    method_cls: type[AdapterModule]
    config: MethodConfig
    targets: list[str]  # logical names, ``path`` or ``path[part]``
    heads: list[str]
    trainable_base: list[str] = field(default_factory=list)
    plugins: dict[str, Any] = field(default_factory=dict)  # name -> vpeft.core.plugins.Plugin, in attachment order
