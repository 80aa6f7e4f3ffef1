"""The injection core: target selection, wrappers, adapter state and files. It knows no method, backbone or dataset."""

from .config import MethodConfig, build_config
from .layers import WHOLE, AdapterModule
from .report import Report
from .targets import Target

__all__ = ["WHOLE", "AdapterModule", "MethodConfig", "Report", "Target", "build_config"]
