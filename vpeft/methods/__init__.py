"""The method registry: one line per method. Tests and tools pick every entry up from here.

``FAMILIES`` groups the registered names as the README's method table does (``python -m vpeft methods`` prints it);
a name registered by a third party (``METHODS["mine"] = Mine``) is listed apart by that command.
"""

from ..core import AdapterModule  # noqa: I001 (one import line per engineer, appended)
from . import dvpt, earth_adapter
from . import spt  # noqa: I001
from . import comp_lora, salt, soma  # noqa: I001
from . import adapter, adaptformer, baselines, bitfit, convpass, dora, fact, ln_tune, lora, repadapter, ssf, vpt

METHODS: dict[str, type[AdapterModule]] = {
    "full": baselines.Full,
    "linear": baselines.LinearProbe,
    "bitfit": bitfit.BitFit,
    "lora": lora.LoRA,
    "adapter": adapter.Adapter,
    "adaptformer": adaptformer.AdaptFormer,
    "convpass": convpass.Convpass,
    "vpt_shallow": vpt.VPTShallow,
    "vpt_deep": vpt.VPTDeep,
    "dora": dora.DoRA,
    "ssf": ssf.SSF,
    "ln_tune": ln_tune.LNTune,
    "fact_tt": fact.FacTTT,
    "fact_tk": fact.FacTTK,
    "repadapter": repadapter.RepAdapter,
    "dvpt": dvpt.DVPT,
    "earth_adapter": earth_adapter.EarthAdapter,
    "spt_lora": spt.SPT,
    "spt_adapter": spt.SPTAdapter,
    "soma": soma.SoMA,
    "salt": salt.SALT,
    "comp_lora": comp_lora.CompLoRA,
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "reference points": ("full", "linear"),
    "VTAB-1k leaderboard baselines": ("bitfit", "ln_tune", "vpt_shallow", "vpt_deep", "adapter", "adaptformer", "lora",
                                      "dora", "ssf", "fact_tt", "fact_tk", "convpass", "repadapter"),  # fmt: skip
    "the suite's vision methods": ("spt_lora", "spt_adapter", "dvpt", "comp_lora", "soma", "earth_adapter", "salt"),
}
