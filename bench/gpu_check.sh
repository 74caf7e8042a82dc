#!/usr/bin/env bash
# The one prepared script for a CUDA machine (DESIGN.md "GPU runs"):
#   bench/gpu_check.sh OUTDIR
# installs this checkout, runs the gpu-marked tests, then the benchmark report, and writes into OUTDIR
#   gpu-tests.txt          pytest output (its exit status is recorded, a failure does not stop the run)
#   <date>-<gpu>.json      benchmark rows (python -m bench --json)
#   <date>-<gpu>.md        the benchmark table
#   summary.txt            exit status of each part
# Every part runs under `timeout`; the whole script stays within about 7 minutes on an H100.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-210}
# The bench stops starting new cases after this many seconds (rows are written as they finish).
BENCH_BUDGET=${BENCH_BUDGET:-170}
# The GPU tests must see the real device, never the CPU interpreter.
unset TRITON_INTERPRET SUBSPACE_OPS_BACKEND || true

echo "== install"
timeout 90 "$PY" -m pip install --no-deps --no-build-isolation -q -e .

echo "== device"
timeout 30 nvidia-smi || echo "nvidia-smi failed (rc=$?)"
timeout 60 "$PY" - <<'EOF' || true
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
EOF

STAMP=$(date -u +%Y%m%d-%H%M)
GPU=$(timeout 60 "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-cuda')" 2>/dev/null || echo unknown)
GPU=$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9-]/-/g' -e 's/--*/-/g' -e 's/^-//' -e 's/-$//')
BASE="$OUTDIR/$STAMP-${GPU:-unknown}"

echo "== gpu tests (timeout ${TESTS_TIMEOUT}s)"
set +e
timeout "$TESTS_TIMEOUT" "$PY" -m pytest -m gpu -x -q tests 2>&1 | tee "$OUTDIR/gpu-tests.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e
echo "gpu tests rc=$TESTS_RC"

BENCH_RC=skipped
if "$PY" -c "import bench" >/dev/null 2>&1; then
    echo "== benchmark report (timeout ${BENCH_TIMEOUT}s)"
    MD_ARGS=()
    if "$PY" -m bench --help 2>/dev/null | grep -q -- "--md"; then
        MD_ARGS=(--md "$BASE.md")
    fi
    set +e
    timeout "$BENCH_TIMEOUT" "$PY" -m bench --device cuda --time-budget "$BENCH_BUDGET" --json "$BASE.json" ${MD_ARGS[@]+"${MD_ARGS[@]}"} 2>&1 | tee "$BASE.log"
    BENCH_RC=${PIPESTATUS[0]}
    set -e
    if [[ ${#MD_ARGS[@]} -eq 0 || ! -s "$BASE.md" ]]; then
        cp "$BASE.log" "$BASE.md"  # the table as printed
    fi
    echo "bench rc=$BENCH_RC"
else
    echo "== benchmark report: skipped (python -m bench is not importable)"
fi

{
    echo "date $STAMP"
    echo "gpu $GPU"
    echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "gpu_tests_rc $TESTS_RC"
    echo "bench_rc $BENCH_RC"
} | tee "$OUTDIR/summary.txt"
