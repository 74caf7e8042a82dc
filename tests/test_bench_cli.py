"""CI smoke test of the benchmark CLI (``python -m bench``) and the pytest-benchmark files.

``--smoke`` (hidden) runs every op and provider at tiny shapes on CPU in seconds; the numbers are
meaningless, the report's structure and arithmetic are what is checked.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {
    "op": str, "provider": str, "m": int, "n": int, "rank": int, "dtype": str, "median_ms": float,
    "p20_ms": float, "p80_ms": float, "bytes": int, "flops": int, "gbps": float, "tflops": float,
    "floor_ms": float, "x_floor": float, "device": str, "copy_gbps": float, "torch": str, "triton": str,
    "git_sha": str,
}


def _run(args, timeout=240, omp_threads="1"):
    # One thread: a smoke test on a busy CI machine must not stall in OpenMP barriers.
    env = dict(os.environ, OMP_NUM_THREADS=omp_threads,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, md, png = out / "rows.json", out / "report.md", out / "plot.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    proc = _run(["-m", "bench", "--smoke", "--device", "cpu", "--json", str(js), "--md", str(md), *plot])
    assert proc.returncode == 0, proc.stderr[-4000:]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc, json.loads(js.read_text()), md.read_text()


def test_json_rows_have_every_key_with_its_type(smoke):
    _, rows, _ = smoke
    assert isinstance(rows, list) and rows
    for row in rows:
        for key, typ in ROW_KEYS.items():
            assert key in row, key
            value = row[key]
            if typ is float:
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
                assert math.isfinite(value), (key, value)
            else:
                assert isinstance(value, typ) and not isinstance(value, bool), (key, value)
        assert row["device"].startswith("cpu")
        assert row["peak_mem_bytes"] is None  # CUDA only
        assert row["median_ms"] > 0 and row["floor_ms"] > 0 and row["bytes"] > 0 and row["flops"] >= 0
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]


def test_floor_and_x_floor_arithmetic(smoke):
    _, rows, _ = smoke
    for row in rows:
        assert row["x_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"], rel=1e-12)
        floor_s = max(row["bytes"] / (row["copy_gbps"] * 1e9), row["flops"] / (row["gemm_tflops"] * 1e12))
        assert row["floor_ms"] == pytest.approx(floor_s * 1e3, rel=1e-9)
        assert row["gbps"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9, rel=1e-6)


def test_every_op_and_cpu_provider_is_reported(smoke):
    _, rows, _ = smoke
    seen = {(r["op"], r["provider"]) for r in rows}
    for op in ("project", "back_project_update", "lowrank_adam", "snsm_step"):
        assert (op, "reference") in seen
    for prov in ("reference", "torch_adamw_foreach"):
        assert ("step", prov) in seen and ("step_amortized", prov) in seen
    assert {("refresh", "svd"), ("refresh", "randomized"), ("refresh", "randomized_warm")} <= seen
    assert not any(r["provider"] == "triton" for r in rows)  # CUDA only
    assert {r["side"] for r in rows} == {"left", "right"}


def test_amortized_step_is_step_plus_refresh_over_gap(smoke):
    _, rows, _ = smoke
    idx = {(r["op"], r["provider"], r["m"], r["n"]): r for r in rows}
    for (op, prov, m, n), row in idx.items():
        if op != "step_amortized" or prov != "reference":
            continue
        want = idx[("step", "reference", m, n)]["median_ms"] + idx[("refresh", "svd", m, n)]["median_ms"] / 200
        assert row["median_ms"] == pytest.approx(want, rel=1e-12)


def test_report_has_header_table_ratios_and_skips(smoke):
    proc, _, md = smoke
    assert md == proc.stdout  # --md writes exactly the printed report
    for text in (proc.stdout, md):
        assert "measured copy bandwidth" in text and "GEMM rate" in text and "git " in text
        assert "| op " in text and "x_floor" in text
        assert "## Ratios" in text and "reference / torch_adamw_foreach" in text
        assert "faster than svd" in text
        assert "step / triton" in text  # listed as skipped on CPU
        assert "## Comparison with galore-torch" in text
        assert "issue" not in text.lower()  # no internal tracker jargon in what users read


def test_ratio_brackets_are_explained_and_follow_the_legend(smoke):
    """The [lo-hi] after each ratio is explained under the ratios, and its numbers are what the
    legend says: lo = p20(a) / p80(b), hi = p80(a) / p20(b), from the same rows as the JSON."""
    _, rows, md = smoke
    lines = md.splitlines()
    ratios = [i for i, line in enumerate(lines) if re.match(r"- .* = [0-9.]+ \[[0-9.]+-[0-9.]+\]", line)]
    assert ratios
    legend = [i for i, line in enumerate(lines) if line.startswith("[lo-hi] after a ratio a / b:")]
    assert len(legend) == 1
    end = next(i for i in range(ratios[0], len(lines)) if not lines[i].startswith("- "))
    assert lines[end] == "" and legend[0] == end + 1  # right under the list of ratios
    assert "lo = p20(a) / p80(b), hi = p80(a) / p20(b)" in lines[legend[0]]
    assert "20th and 80th percentiles" in lines[legend[0]] and "interleaved timing rounds" in lines[legend[0]]
    idx = {(r["op"], r["provider"], r["m"], r["n"], r["rank"], r["dtype"]): r for r in rows}
    pattern = re.compile(
        r"- (\S+) (\d+)x(\d+) r(\d+) (\w+): (\S+) / (\S+) = ([0-9.]+) \[([0-9.]+)-([0-9.]+)\]"
    )
    for i in ratios:
        op, m, n, rank, dt, a, b, q, lo, hi = pattern.match(lines[i]).groups()
        ra, rb = (idx[(op, p, int(m), int(n), int(rank), dt)] for p in (a, b))
        assert float(q) == pytest.approx(ra["median_ms"] / rb["median_ms"], abs=6e-4)
        assert float(lo) == pytest.approx(ra["p20_ms"] / rb["p80_ms"], abs=6e-4)
        assert float(hi) == pytest.approx(ra["p80_ms"] / rb["p20_ms"], abs=6e-4)


def test_quick_runs_on_one_thread_unless_told_otherwise(monkeypatch):
    # torch's own default here would be 2 threads (OMP_NUM_THREADS=2); --quick makes it 1.
    tiny = ["--shapes", "64x48", "--ranks", "8", "--ops", "lowrank_adam", "--providers", "reference", "--rounds", "3"]
    proc = _run(["-m", "bench", "--quick", "--device", "cpu", *tiny], omp_threads="2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "threads 1, date" in proc.stdout
    # An explicit --threads wins in every mode; without one only the short runs pin a single thread.
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.cli import default_threads

    assert default_threads(3, "quick") == 3 and default_threads(2, "smoke") == 2 and default_threads(2, "full") == 2
    assert default_threads(None, "quick") == 1 and default_threads(None, "smoke") == 1
    assert default_threads(None, "full") is None  # torch's default


def test_bad_arguments_exit_with_usage_error():
    proc = _run(["-m", "bench", "--smoke", "--dtypes", "fp8"], timeout=120)
    assert proc.returncode == 2 and "unknown dtype" in proc.stderr


def test_pytest_benchmark_files_run_once():
    proc = _run(["-m", "pytest", "bench", "--benchmark-disable", "-q", "-p", "no:cacheprovider"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
