"""The method registry: one line per method. Tests and tools pick every entry up from here."""

from ._registry import METHODS  # noqa: I001 (one import line per engineer, appended)
from . import dvpt, earth_adapter
from . import spt  # noqa: I001
from . import comp_lora, salt, soma  # noqa: I001
from . import adapter, adaptformer, baselines, bitfit, convpass, dora, fact, ln_tune, lora, repadapter, ssf, vpt

METHODS |= {  # the dict itself lives in _registry, where a method may look others up (SPT)
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
