"""The package works without Triton and without a GPU (the reference path needs neither)."""
import subprocess
import sys
import textwrap


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


def test_kernels_package_does_not_shadow_a_top_level_kernels():
    import importlib.util

    import subspace_ops.kernels

    assert subspace_ops.kernels.__name__ == "subspace_ops.kernels"
    spec = importlib.util.find_spec("kernels")
    # Nothing of ours is importable as a top-level `kernels` (an unrelated PyPI distribution owns it).
    assert spec is None or "subspace" not in str(spec.origin)
