"""The injection core: target selection, wrappers, adapter state and files. It knows no method, backbone or dataset.

This is the core's one public face: code outside ``vpeft/core`` imports from here, never from a submodule.

Writing a method
    :class:`AdapterModule` (the base class), :class:`MethodConfig` and :func:`build_config` (options checked field by
    field; the option types ``PositiveInt``, ``NonNegativeInt``, ``DropProbability``, ``ProperFraction``,
    ``PositiveFloat``, ``NonNegativeFloat``, ``FiniteFloat``, ``Rank`` and ``LenientRank`` declare their ranges,
    :func:`option_types` says them in words),
    :class:`Target` (one place an adapter attaches), ``WHOLE`` (the part name of a whole-module adapter);
    :class:`Prepared` (what ``prepare`` returns to hand each target its own initial state, as ``Target.init``);
    the calibration service (statistics of the base model on calibration data, for ``prepare``):
    :func:`input_covariance`, :func:`weight_gradients`, :func:`calibration_loss`, and :func:`cached` (results
    stored as safetensors files keyed by statistic, options, model and data, see :func:`fingerprint`);
    reading a model as the core does: ``ROLES``, :func:`name_matches`, :func:`fused_parts`, :func:`walk`,
    :func:`weight_and_bias`, :func:`is_conv1d`, and :func:`select_targets` (what a config adapts on a model);
    attention heads as rows and columns of weights: :func:`head_layout` (a :class:`HeadLayout`, GQA included).

Named adapters on a model (the entry points :mod:`vpeft.api` binds to the method registry)
    :func:`add_adapter`, :func:`set_adapter`, :func:`delete_adapter`, :func:`disabled`, :func:`merge`,
    :func:`unmerge`, :func:`report` (a :class:`Report`), :func:`method_loss`, :func:`on_step`.

Adapter state
    :func:`active_adapter` (the name that runs and trains), :func:`adapter_names`, :func:`adapter_record` (an
    :class:`AdapterRecord`: method, config, targets, heads), :func:`unmerged_adapter`, :func:`layers_of` and
    :func:`shared_of` (an adapter's modules), :func:`adapted_modules` (each module it changes, as an
    :class:`AdaptedModule`), :func:`adapter_tensors` and :func:`load_adapter_tensors` (its tensors under their file
    keys), :func:`no_weight_decay` (its tensors kept out of weight decay), :func:`lr_multipliers` (its tensors
    trained at a multiple of the learning rate), :func:`head_tensors` (its copy of the task head),
    :func:`fsdp_units` (FSDP wrapping that never mixes frozen and trainable tensors in one unit).

Virtual tokens (prompt and prefix tuning)
    An adapter module with ``virtual`` set adds tokens to the model's call, which the core rewrites (masks, position
    ids, labels, the key/value cache, ``generate()``); :func:`call_site` (the module whose call is rewritten) and
    :func:`input_embedding` (its token embedding, where such a module sits) say where.

Controllers (vpeft/core/control.py)
    :func:`control` (the loop's callback at the start of each optimizer step, with a :class:`StepContext`),
    :func:`trainable_count`, :func:`rebuild_adapter` (an adapter rebuilt at the shapes its saved config says),
    :func:`gather` and :func:`swap_parameter` (an optimiser's state following a resized parameter).

Plug-ins and the loss context (a training step's extra losses and perturbations, beside any method)
    :class:`Plugin` (the base class), :func:`add_plugin`, :func:`plugins_of`; :func:`loss_context` (records the
    step's forward pass into a :class:`LossContext`: model, batch, outputs), :func:`perturb` and :func:`restore`
    (around an optimizer step's passes), :func:`plugin_weight_decay` (the decay plug-ins set for some tensors).

Adapter files
    :func:`write_adapter`, :func:`read_adapter`; ``CONFIG_FILE`` and ``WEIGHTS_FILE`` name the two files.
"""

from .calibration import cached, calibration_loss, fingerprint, input_covariance, weight_gradients
from .config import (
    DropProbability,
    FiniteFloat,
    LenientRank,
    MethodConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ProperFraction,
    Rank,
    build_config,
    config_to_dict,
    option_types,
)
from .control import StepContext, control, gather, rebuild_adapter, swap_parameter, trainable_count
from .heads import HeadLayout, head_layout
from .inject import (
    AdaptedModule,
    active_adapter,
    adapted_modules,
    adapter_names,
    adapter_record,
    add_adapter,
    delete_adapter,
    disabled,
    fsdp_units,
    head_tensors,
    layers_of,
    lr_multipliers,
    merge,
    method_loss,
    no_weight_decay,
    on_step,
    report,
    set_adapter,
    shared_of,
    unmerge,
    unmerged_adapter,
)
from .io import CONFIG_FILE, WEIGHTS_FILE, adapter_tensors, load_adapter_tensors, read_adapter, write_adapter
from .layers import AdapterModule, AdapterRecord, Prepared
from .modules import WHOLE, Target, fused_parts, is_conv1d, weight_and_bias
from .plugins import LossContext, Plugin, add_plugin, loss_context, perturb, plugin_weight_decay, plugins_of, restore
from .report_table import Report
from .roles import ROLES
from .targets import name_matches, select_targets, walk
from .virtual import call_site, input_embedding

__all__ = [
    "CONFIG_FILE",
    "ROLES",
    "WEIGHTS_FILE",
    "WHOLE",
    "AdaptedModule",
    "AdapterModule",
    "AdapterRecord",
    "HeadLayout",
    "LossContext",
    "Plugin",
    "MethodConfig",
    "Prepared",
    "Report",
    "StepContext",
    "Target",
    "active_adapter",
    "adapted_modules",
    "adapter_names",
    "adapter_record",
    "adapter_tensors",
    "add_adapter",
    "add_plugin",
    "build_config",
    "cached",
    "calibration_loss",
    "call_site",
    "config_to_dict",
    "control",
    "gather",
    "rebuild_adapter",
    "swap_parameter",
    "trainable_count",
    "delete_adapter",
    "disabled",
    "fingerprint",
    "fsdp_units",
    "fused_parts",
    "input_embedding",
    "head_layout",
    "head_tensors",
    "is_conv1d",
    "input_covariance",
    "layers_of",
    "load_adapter_tensors",
    "loss_context",
    "lr_multipliers",
    "merge",
    "method_loss",
    "name_matches",
    "no_weight_decay",
    "on_step",
    "option_types",
    "perturb",
    "plugin_weight_decay",
    "plugins_of",
    "read_adapter",
    "report",
    "restore",
    "select_targets",
    "set_adapter",
    "shared_of",
    "unmerge",
    "unmerged_adapter",
    "walk",
    "weight_gradients",
    "weight_and_bias",
    "write_adapter",
    "DropProbability",
    "FiniteFloat",
    "LenientRank",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "ProperFraction",
    "Rank",
]
