"""``python -m bench --op host_step`` (bench/host.py): the host cost of ``opt.step()`` on the Triton
path, kernels compiled for sm_90 and never launched.

The measurement runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and
the compile path needs real JIT functions, not interpreter ones), at ``--smoke`` size: one LLaMA-7B
layer (7 matrices, 3 norm vectors), a few steps. The numbers are meaningless; the structure, the
launch count and the arithmetic are what is checked.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import host

ROOT = Path(__file__).resolve().parent.parent


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec("triton.backends.nvidia") is not None


def test_the_7b_parameter_set():
    cfg = host.MODES["full"]
    shapes = host.matrix_shapes(cfg)
    assert len(shapes) == 224 and host.norm_count(cfg) == 65
    counts = {}
    for _, m, n in shapes:
        counts[(m, n)] = counts.get((m, n), 0) + 1
    assert counts == {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}
    assert cfg.rank == 256 and cfg.dtype == "bf16"


def test_aliased_views_are_distinct_aligned_and_contiguous():
    shapes = [(64, 32), (32, 64), (48, 16)]
    buf, views = host._aliased(shapes, torch.bfloat16, per=2)
    ptrs = [v.data_ptr() for row in views for v in row]
    assert len(set(ptrs)) == len(ptrs)
    assert all(p % host.ALIGN_BYTES == 0 for p in ptrs)
    end = buf.data_ptr() + buf.numel() * buf.element_size()
    for (m, n), row in zip(shapes, views):
        for v in row:
            assert v.shape == (m, n) and v.is_contiguous() and v.untyped_storage().data_ptr() == buf.data_ptr()
            assert v.data_ptr() + v.numel() * v.element_size() <= end


def test_host_step_refuses_triton_interpret_in_process(monkeypatch):
    from bench import cli

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        cli.main(["--op", "host_step", "--smoke"])


def _bench(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SUBSPACE_OPS_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_host_step_op_runs_alone():
    proc = _bench(["--op", "host_step,step", "--smoke"], timeout=120)
    assert proc.returncode == 2 and "runs alone" in proc.stderr
    proc = _bench(["--smoke", "--layers", "2"], timeout=120)
    assert proc.returncode == 2 and "--op host_step" in proc.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not _nvidia_backend():
        pytest.skip("needs triton with its NVIDIA backend (compiles for sm_90)")
    out = tmp_path_factory.mktemp("host_step")
    js, md = out / "host.json", out / "host.md"
    proc = _bench(["--op", "host_step", "--smoke", "--profile", "2", "--json", str(js), "--md", str(md)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc, json.loads(js.read_text()), md.read_text()


def test_rows_and_arithmetic(smoke):
    _, doc, _ = smoke
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == set(host.PROVIDERS)
    assert doc["matrices"] == 7 and doc["vectors"] == 3
    for r in rows.values():
        assert r["op"] == "host_step" and r["matrices"] == 7 and r["params"] == 10
        assert 0 < r["min_ms"] <= r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["us_per_matrix"] == pytest.approx(r["median_ms"] * 1e3 / 7, rel=1e-9)
        assert r["us_per_param"] == pytest.approx(r["median_ms"] * 1e3 / 10, rel=1e-9)
        assert r["us_per_matrix_p20"] <= r["us_per_matrix"] <= r["us_per_matrix_p80"]
        assert r["torch_adamw_fused_us_per_param"] == pytest.approx(rows["torch_adamw_fused"]["us_per_param"])
        assert r["x_torch_adamw_fused"] == pytest.approx(r["median_ms"] / rows["torch_adamw_fused"]["median_ms"])
        assert r["profile"] and r["profile"][0]["total_own_us_per_matrix"] > 0
    assert rows["torch_adamw_fused"]["launches_per_step"] is None


def test_launches_per_step_and_no_compiles_while_timed(smoke):
    _, doc, _ = smoke
    for name in host.OURS:
        r = doc["rows"][[x["provider"] for x in doc["rows"]].index(name)]
        # one layer: 3 shapes (4096x4096, 11008x4096, 4096x11008) x (projection + back-projection),
        # plus one multi-tensor AdamW launch for the norm vectors
        assert r["launches_per_step"] == 7, r["launches_by_kernel_grid"]
        kernels = {k.split()[0] for k in r["launches_by_kernel_grid"]}
        assert kernels == {"_project_kernel", "_back_project_kernel", "_adamw_kernel"}
        assert r["compiles_in_timed_steps"] == 0 and r["arch"] == "sm_90"
    assert doc["compiles_in_timed_steps"] == 0
    assert doc["timed_launches"] == doc["timed_launches_expected"] > 0


def test_report_is_printed_and_written(smoke):
    proc, _, md = smoke
    assert md == proc.stdout
    assert "host_step" in md and "us/matrix" in md and "launches/step" in md and "load average" in md
    assert "cProfile" in md
