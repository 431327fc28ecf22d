"""Optional back-ends (`decord`, `soundfile`, `av`, `matplotlib`, ...) imported on first use.

`import modeling_mico` must work, and stay fast, without them; a feature that needs one fails with an error that
names the package and the extra of `mico-transformers` that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


# Import name -> (distribution on PyPI, extra of mico-transformers that installs it).
OPTIONAL_BACKENDS = {
    "decord": ("decord", "mico-transformers"),
    "soundfile": ("soundfile", "mico-transformers"),
    "av": ("av", "mico-transformers"),
    "matplotlib": ("matplotlib", "mico-transformers[train]"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import an optional back-end, or raise `ImportError` naming it, the feature that needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package, extra = OPTIONAL_BACKENDS.get(module.split(".")[0], (module, "mico-transformers"))
        raise ImportError(
            f"{feature} needs the `{package}` package, which is not installed: `pip install {package}` "
            f"(or `pip install '{extra}'`)"
        ) from err
