"""Import galore-torch 1.0 (the research code we are a drop-in for) for parity tests and benchmarks.

galore-torch imports ``transformers`` (only for ``require_version``) and ``bitsandbytes`` (only for
its 8-bit optimizer) at import time. Neither is needed by its ``GaLoreAdamW``, so when they are not
installed, minimal stand-ins are registered in ``sys.modules`` for exactly the names it imports.
Install galore-torch itself with ``pip install --no-deps galore-torch==1.0``.
"""
from __future__ import annotations

import importlib
import sys
import types


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def import_galore_torch():
    """Return the ``galore_torch`` module; raises ImportError when galore-torch is not installed."""
    if importlib.util.find_spec("galore_torch") is None:
        raise ImportError("galore-torch is not installed: pip install --no-deps galore-torch==1.0")
    try:
        importlib.import_module("transformers.utils.versions")
    except ImportError:
        _stub("transformers")
        _stub("transformers.utils")
        _stub("transformers.utils.versions", require_version=lambda *args, **kwargs: None)
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        _stub("bitsandbytes")
        _stub("bitsandbytes.functional")
        _stub("bitsandbytes.optim")
        _stub("bitsandbytes.optim.optimizer", Optimizer2State=object)
    return importlib.import_module("galore_torch")
