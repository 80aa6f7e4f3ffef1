"""The method registry: one line per method. Tests and tools pick every entry up from here.

``FAMILIES`` groups the registered names as the README's method table does (``python -m vpeft methods`` prints it);
a name registered by a third party (``METHODS["mine"] = Mine``) is listed apart by that command.
"""

from . import (
    adapter,
    adaptformer,
    baselines,
    bitfit,
    comp_lora,
    convpass,
    coop,
    dora,
    dvpt,
    dylora,
    earth_adapter,
    fact,
    ffa_lora,
    hut,
    ia3,
    ln_tune,
    lora,
    neuroada,
    repadapter,
    s2_lora,
    s2ft,
    salt,
    soma,
    spt,
    ssf,
    vera,
    vpt,
)
from ._registry import METHODS

METHODS |= {  # the dict itself lives in _registry, where a method may look others up (SPT)
    "full": baselines.Full,
    "frozen": baselines.Frozen,
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
    "coop": coop.CoOp,
    "ia3": ia3.IA3,
    "vera": vera.VeRA,
    "ffa_lora": ffa_lora.FFALoRA,
    "dylora": dylora.DyLoRA,
    "s2_lora": s2_lora.S2LoRA,
    "hut": hut.HUT,
    "s2ft": s2ft.S2FT,
    "neuroada": neuroada.NeuroAda,
}

# methods with nothing to adapt on an image encoder alone: they need a CLIP text tower (tasks/clip.py)
TEXT_TOWER_METHODS = ("coop",)

FAMILIES: dict[str, tuple[str, ...]] = {
    "reference points": ("full", "linear", "frozen"),
    "VTAB-1k leaderboard baselines": ("bitfit", "ln_tune", "vpt_shallow", "vpt_deep", "adapter", "adaptformer", "lora",
                                      "dora", "ssf", "fact_tt", "fact_tk", "convpass", "repadapter"),  # fmt: skip
    "the suite's vision methods": ("spt_lora", "spt_adapter", "dvpt", "comp_lora", "soma", "earth_adapter", "salt"),
    "prompt learning for CLIP's text tower": TEXT_TOWER_METHODS,
    "layer-level language-model methods": ("ia3", "vera", "ffa_lora", "dylora", "s2_lora", "hut", "s2ft", "neuroada"),
}
