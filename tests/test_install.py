"""How the package is installed and imported.

It works without Triton and without a GPU (the reference path needs neither); its kernels are this
checkout's ``kernels/`` folder, installed as ``subspace_ops.kernels`` and never as a top-level
``kernels``; and a checkout that is not installed, or that is mixed with another installed checkout,
fails to import with an ``ImportError`` that says so and how to fix it (subspace_ops/_install_check.py).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout these tests belong to


def test_import_and_train_without_triton():
    # The path finder no longer finds `triton`: as on a machine where it is not installed
    # (importlib.util.find_spec returns None, `import triton` raises ModuleNotFoundError).
    code = textwrap.dedent(
        """
        import sys, importlib.machinery
        find = importlib.machinery.PathFinder.find_spec
        def find_spec(name, path=None, target=None):
            return None if name.split(".")[0] == "triton" else find(name, path, target)
        importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
        try:
            import triton
            raise SystemExit("triton still importable")
        except ModuleNotFoundError:
            pass
        import torch, subspace_ops
        from subspace_ops import kernels
        assert not kernels.HAS_TRITON and "triton" not in sys.modules
        p = torch.randn(12, 8, requires_grad=True)
        opt = subspace_ops.GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-2)
        for _ in range(3):
            p.grad = torch.randn(12, 8)
            opt.step()
        r = subspace_ops.project(torch.randn(12, 8), torch.linalg.qr(torch.randn(8, 2))[0], "right")
        assert r.shape == (12, 2) and torch.isfinite(p).all()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _env(pythonpath=False):
    """The test process's environment; PYTHONPATH dropped, or (``pythonpath=True``) kept without the
    entries that point into this checkout: then only the install and the cwd decide what is imported."""
    env = dict(os.environ)
    entries = env.pop("PYTHONPATH", "").split(os.pathsep)
    entries = entries if pythonpath else []
    entries = [e for e in entries if e and not Path(e).resolve().is_relative_to(ROOT)]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    return env


def _python(code, cwd, timeout=120, pythonpath=False):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(pythonpath), capture_output=True,
        text=True, timeout=timeout,
    )


def test_kernels_are_this_checkouts_and_never_a_top_level_kernels(tmp_path):
    """``subspace_ops.kernels`` is this checkout's ``kernels/`` folder, and the install provides no
    top-level ``kernels`` (setup.py maps the folder into the package: an unrelated PyPI distribution
    owns that name).

    Where the checkout lives and what its folder is called do not matter. The top-level question is
    asked in a subprocess started outside the checkout: ``python -m pytest`` puts the checkout's root
    on ``sys.path``, where the ``kernels/`` folder is importable as ``kernels`` as any folder there
    would be; that is the clone's layout, not something the install provides. A top-level ``kernels``
    from elsewhere (that unrelated distribution) is allowed; ours is not.

    Run from a checkout that is not the installed one, ``import subspace_ops`` already fails here, with
    the ImportError of subspace_ops/_install_check.py naming the fix (``pip install -e <checkout>``):
    the tests of a checkout must not silently run against another copy.
    """
    import subspace_ops
    import subspace_ops.kernels

    assert subspace_ops.kernels.__name__ == "subspace_ops.kernels"
    assert Path(subspace_ops.__file__).resolve().parent == ROOT / "subspace_ops", (
        f"these tests belong to {ROOT} but import subspace_ops from {subspace_ops.__file__}: pip install -e {ROOT}"
    )
    assert Path(subspace_ops.kernels.__file__).resolve().parent == ROOT / "kernels"
    # Importing subspace_ops.kernels does not register our folder under the top-level name too. Asked
    # in a fresh process started at the checkout's root, as `python -m pytest` is: in this process
    # another library may have looked the name up (transformers probes for a `kernels` package, and
    # with the root on sys.path it finds and imports our folder: a clone's layout, not the install).
    fresh = _python(
        """
        import sys
        import subspace_ops, subspace_ops.kernels
        print("kernels" in sys.modules)
        """,
        cwd=ROOT,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == "False"

    out = _python(
        """
        import importlib.util, json, sys
        import subspace_ops, subspace_ops.kernels
        spec = importlib.util.find_spec("kernels")
        print(json.dumps({
            "package": subspace_ops.__file__, "kernels": subspace_ops.kernels.__file__,
            "top_level_kernels": spec.origin if spec else None, "imported": "kernels" in sys.modules,
        }))
        """,
        cwd=tmp_path,
        pythonpath=True,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    # The install is this checkout (the in-process import above would have failed otherwise) ...
    assert Path(found["kernels"]).resolve().parent == ROOT / "kernels"
    # ... and it makes no top-level `kernels` of ours importable, nor imports one.
    origin = found["top_level_kernels"]
    assert origin is None or not Path(origin).resolve().is_relative_to(ROOT), origin
    assert not found["imported"]


# -- an uninstalled or mixed checkout -------------------------------------------------------------
# The subprocesses below see no install of subspace-ops at all: the prelude keeps only Python's own
# import finders (an editable install adds its own finder to sys.meta_path; a wheel install is never
# consulted for subspace_ops.kernels once subspace_ops came from the current directory). Where a test
# needs an installed checkout, it adds a finder that maps the two packages to that checkout's folders,
# as an editable install's finder does.
NO_INSTALL = """
import sys, importlib.machinery as m
sys.meta_path[:] = [f for f in sys.meta_path if f in (m.BuiltinImporter, m.FrozenImporter, m.PathFinder)]
"""

INSTALLED_AT = NO_INSTALL + """
import importlib.util
from pathlib import Path
CHECKOUT = Path({checkout!r})
class EditableInstall:
    MAPPING = {{"subspace_ops": CHECKOUT / "subspace_ops", "subspace_ops.kernels": CHECKOUT / "kernels"}}
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in cls.MAPPING:
            folder = cls.MAPPING[name]
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        return None
sys.meta_path.append(EditableInstall)
"""


def _checkout(dst: Path) -> Path:
    """A copy of the parts of this checkout an install is made of, in a folder named like a clone."""
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("subspace_ops", "kernels"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=ignore)
    shutil.copy(ROOT / "setup.py", dst / "setup.py")
    return dst


def _import_error(out) -> str:
    assert out.returncode != 0, out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), out.stderr
    assert "circular import" not in out.stderr
    return last


def test_a_checkout_that_is_not_installed_says_so(tmp_path):
    clone = _checkout(tmp_path / "subspace-ops")
    out = _python(NO_INSTALL + "import subspace_ops\n", cwd=clone)
    message = _import_error(out)
    assert "is not installed" in message
    assert f"pip install -e {clone.resolve()}" in message


def test_a_checkout_mixed_with_another_installed_one_says_so(tmp_path):
    installed = _checkout(tmp_path / "installed" / "subspace-ops")
    clone = _checkout(tmp_path / "subspace-ops")
    code = INSTALLED_AT.format(checkout=str(installed)) + textwrap.dedent(
        """
        try:
            import subspace_ops
        except ImportError:
            assert "subspace_ops.kernels" not in sys.modules  # the other copy's kernels are not left behind
            raise
        """
    )
    # From inside the clone, its subspace_ops/ is found first, the installed checkout's kernels after it.
    message = _import_error(_python(code, cwd=clone))
    assert "two copies of subspace-ops are mixed" in message
    assert str(clone.resolve() / "subspace_ops") in message and str(installed.resolve() / "kernels") in message
    assert f"pip install -e {clone.resolve()}" in message
    # The same install used from elsewhere is consistent and imports.
    ok = _python(code + "print(subspace_ops.kernels.__file__)\n", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()).resolve().parent == installed.resolve() / "kernels"


def test_a_copy_in_the_current_environment_is_never_silently_mixed(tmp_path):
    """A copied checkout run from its own folder, with whatever this environment has installed: an
    editable install of another checkout (mixed) or none that reaches it (not installed) is an
    ImportError naming the copy's own install command, never kernels from elsewhere."""
    clone = _checkout(tmp_path / "subspace-ops")
    message = _import_error(_python("import subspace_ops\n", cwd=clone))
    assert f"pip install -e {clone.resolve()}" in message


def test_a_wheel_install_passes_the_check(tmp_path):
    """A wheel puts the kernels inside the package (site-packages/subspace_ops/kernels): accepted."""
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "subspace_ops", site / "subspace_ops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "subspace_ops" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = NO_INSTALL + f"sys.path.insert(0, {str(site)!r})\n" + textwrap.dedent(
        """
        import torch, subspace_ops
        p = torch.randn(12, 8, requires_grad=True)
        opt = subspace_ops.GaLoreAdamW([{"params": [p], "rank": 2}], lr=1e-2)
        p.grad = torch.randn(12, 8)
        opt.step()
        print(subspace_ops.kernels.__file__)
        """
    )
    out = _python(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == (site / "subspace_ops" / "kernels").resolve()
