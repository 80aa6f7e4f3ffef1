"""vpeft: parameter-efficient fine-tuning of vision and medical-imaging foundation models.

import timm, vpeft
model = timm.create_model("vit_base_patch16_224", num_classes=100)
print(vpeft.apply_method(model, "lora"))     # VTAB-1k defaults: r=8 on q and v
vpeft.save_adapter(model, "out/adapter")
optimizer = vpeft.build_optimizer(model, "adamw", lr=1e-3)   # or galore, natural_galore, gradnorm_lorp (vpeft.optim)
"""

from .api import (
    StepContext,
    __version__,
    apply_method,
    control,
    delete_adapter,
    disabled,
    export_hf_peft,
    import_hf_peft,
    list_methods,
    list_plugins,
    load_adapter,
    loss_context,
    merge,
    method_loss,
    on_step,
    perturb,
    report,
    restore,
    save_adapter,
    set_adapter,
    unmerge,
)
from .core import Report
from .optim import OPTIMIZERS, build_optimizer

__all__ = [
    "OPTIMIZERS",
    "Report",
    "StepContext",
    "__version__",
    "apply_method",
    "build_optimizer",
    "control",
    "delete_adapter",
    "disabled",
    "export_hf_peft",
    "import_hf_peft",
    "list_methods",
    "list_plugins",
    "load_adapter",
    "loss_context",
    "merge",
    "method_loss",
    "on_step",
    "perturb",
    "report",
    "restore",
    "save_adapter",
    "set_adapter",
    "unmerge",
]
