"""Checks, at import, that ``subspace_ops`` and ``subspace_ops.kernels`` come from the same copy.

The kernels live in the top-level ``kernels/`` folder of a checkout and become ``subspace_ops.kernels``
only through the install (``setup.py`` maps the folder with ``package_dir``; docs/design.md, Layout).
So a checkout that Python finds through the current directory or ``PYTHONPATH`` but that is not
installed has no ``subspace_ops.kernels``; and when another checkout is installed in editable mode,
its install supplies ``subspace_ops.kernels`` from *that* checkout's ``kernels/`` folder, silently
mixing two versions of the code. Both raise an ``ImportError`` that says which paths were found
and how to fix it.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

KERNELS = "subspace_ops.kernels"


def _fix(package_dir: Path) -> str:
    root = package_dir.parent
    if (root / "setup.py").is_file() and (root / "kernels").is_dir():
        return f"install this checkout: pip install -e {root}"
    return "reinstall the package: pip install subspace-ops (or pip install -e /path/to/your/checkout)"


def check(package_file: str) -> None:
    """Raise ``ImportError`` unless ``subspace_ops.kernels`` belongs to the ``subspace_ops`` at ``package_file``.

    Accepted layouts: an installed wheel (``<package>/kernels``) and a source checkout installed in
    editable mode (``<package>/../kernels``, the checkout's own ``kernels/`` folder).
    """
    package_dir = Path(package_file).resolve().parent
    try:
        kernels = importlib.import_module(KERNELS)
    except ModuleNotFoundError as exc:
        if exc.name != KERNELS:
            raise
        raise ImportError(
            f"subspace_ops was imported from {package_dir}, but its kernels (subspace_ops.kernels) cannot "
            "be imported: this copy of subspace-ops is not installed (Python found the source folder "
            "through the current directory or PYTHONPATH; the kernels/ folder becomes subspace_ops.kernels "
            f"only through the install). Fix: {_fix(package_dir)}",
            name="subspace_ops",
        ) from None
    location = getattr(kernels, "__file__", None)
    found = Path(location).resolve().parent if location else None
    if found not in (package_dir / "kernels", package_dir.parent / "kernels"):
        sys.modules.pop(KERNELS, None)  # do not leave the other copy's kernels behind
        raise ImportError(
            f"subspace_ops was imported from {package_dir}, but subspace_ops.kernels from "
            f"{found if found else 'an unknown location'}: two copies of subspace-ops are mixed (typically "
            "this checkout is found through the current directory or PYTHONPATH while another "
            "checkout is the one installed, in editable mode, and supplies the kernels). "
            f"Fix: {_fix(package_dir)}; or run from outside this checkout to use the installed copy",
            name="subspace_ops",
        )
