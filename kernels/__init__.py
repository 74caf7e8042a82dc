"""Triton kernels and their launchers (installed as ``subspace_ops.kernels``).

Only kernels live here: no optimizer logic, no autograd. Importing this package is cheap and works
without Triton; the kernel modules themselves import Triton.
"""
import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
