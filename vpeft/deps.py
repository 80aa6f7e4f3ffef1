"""Optional dependencies: a path that needs a package outside vpeft's base dependencies imports it through
:func:`require`, which names the package, the extra that installs it and the command, instead of a bare traceback.

Each extra in ``pyproject.toml`` installs what its paths import (``tests/test_deps.py`` checks it on the source):
``clip`` (open_clip backbones), ``sam`` (SAM backbones and heads), ``hf`` (Hugging Face models), ``seg`` and ``det``
(the dense tasks, with ``shapes``, the offline scenes they train on), ``medical`` (the MONAI data path), ``mmseg``
(the mmsegmentation integration), ``offline`` (the digits dataset). This module imports nothing of vpeft but
:mod:`vpeft.errors`, so every layer may use it.
"""

from __future__ import annotations

import sys
from types import ModuleType

from .errors import MissingDependencyError

# import name -> the distribution pip installs it from, where the two differ
DISTRIBUTIONS = {
    "open_clip": "open_clip_torch",
    "segment_anything": "segment-anything",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "mmseg": "mmsegmentation",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "pydantic_core": "pydantic",  # pydantic's own engine, installed and versioned by pydantic
}


def distribution(module: str) -> str:
    """The pip distribution that provides ``module`` (dotted; its top-level package decides)."""
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module`` (dotted, e.g. ``"monai.losses"``), which ``purpose`` needs.

    If it cannot be imported, raise :class:`~vpeft.errors.MissingDependencyError` (an ``ImportError``) that names the
    package, the import error, and ``pip install 'vpeft[extra]'``.
    """
    try:
        __import__(module)  # the import statement's own hook, as `import module` would call it
    except ImportError as err:
        package = distribution(module)
        raise MissingDependencyError(
            f"{purpose} needs {package}, which cannot be imported ({err}). It comes with vpeft's {extra!r} extra: "
            f"pip install 'vpeft[{extra}]'."
        ) from err
    return sys.modules[module]
