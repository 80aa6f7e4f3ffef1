"""The plug-in registry: training-time loss terms, activation taps and weight perturbations that run beside the
active adapter, whatever its method (the base class and the hooks are the core's: :mod:`vpeft.core.plugins`).

In a run config they are a top-level list, off by default::

    plugins:
      - {name: density_loss, weight: 0.1}

and from Python ``vpeft.apply_method(model, "lora", plugins=[{"name": "density_loss", "weight": 0.1}])``. Each
entry's options are checked like a method's; the adapter file saves them and ``vpeft.load_adapter`` rebuilds them.
"""

from typing import Any

from ..core import MethodConfig, Plugin, build_config
from ..errors import ConfigError
from ..registry import lookup
from . import ba_lora, density_loss, ggpo, lora_b_decay

PLUGINS = {
    "ba_lora": ba_lora.BALoRA,  # BA-LoRA's consistency, diversity and SVD regularisers (arXiv 2408.04556)
    "density_loss": density_loss.DensityLoss,  # DEFT's activation-density loss (arXiv 2402.01911)
    "ggpo": ggpo.GGPO,  # LoRA-GGPO's gradient-guided weight perturbation (arXiv 2502.14538)
    "lora_b_decay": lora_b_decay.LoRABDecay,  # STAR's decoupled weight decay on LoRA's B (arXiv 2403.01165)
}


def build_plugins(specs: Any) -> list[tuple[str, type[Plugin], MethodConfig]]:
    """``[{name: ..., <options>}, ...]`` checked into ``(name, class, config)`` triples: every entry a mapping with a
    registered ``name``, its options checked by the plug-in's config class, each name at most once."""
    if specs is None:
        return []
    if isinstance(specs, dict | str) or not isinstance(specs, list | tuple):
        raise ConfigError(
            f"plugins must be a list of mappings, each with a name and the plug-in's options (e.g. "
            f"[{{name: density_loss, weight: 0.1}}]), got {specs!r:.80}."
        )
    built, seen = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(
                f"plugins[{i}] must be a mapping with a name (one of {', '.join(sorted(PLUGINS))}) and the plug-in's "
                f"options, e.g. {{name: density_loss, weight: 0.1}}; got {spec!r:.80}."
            )
        options = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
        cls = lookup(PLUGINS, name, "plug-in")
        if name in seen:
            raise ConfigError(f"plugins[{i}]: plug-in {name!r} is listed twice; list each plug-in once.")
        seen.add(name)
        built.append((name, cls, build_config(cls.Config, options, name)))
    return built
