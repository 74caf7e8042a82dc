#!/usr/bin/env bash
# The one prepared script for a CUDA machine (DESIGN.md "GPU runs"):
#   bench/gpu_check.sh OUTDIR
# Installs this checkout and runs, in this order, each part under `timeout`, a failing part never
# stopping the later ones:
#   install      pip install --no-deps --no-build-isolation -e .
#   env          nvidia-smi, torch/triton versions                          -> env.txt
#   gpu_tests    pytest -m gpu (pytest-xdist -n 4 when installed, no -x)    -> gpu-tests.txt
#   bench_target python -m bench --device cuda --target-only                -> bench-target.{json,md}
#   bench_rest   python -m bench --device cuda --no-target --time-budget S  -> bench-rest.{json,md}
#   codegen      python -m bench --compile-only sm_90 (static report)       -> codegen-sm90.json, ptx/
#   summary.txt  each part's exit status and seconds (124: hit its timeout)
# The whole script ends within TOTAL_S seconds (default 340, under 6 minutes): each part's timeout is
# cut to what is left, and a part with under 10 s left is skipped (rc "skipped"). Part timeouts:
# INSTALL_S ENV_S TESTS_S TARGET_S REST_S CODEGEN_S (environment variables, defaults below).
# PYTHON selects the interpreter (default python3).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-340}
INSTALL_S=${INSTALL_S:-40}
ENV_S=${ENV_S:-15}
TESTS_S=${TESTS_S:-120}
TARGET_S=${TARGET_S:-60}
REST_S=${REST_S:-45}
REST_BUDGET_S=${REST_BUDGET_S:-25}   # the rest starts no new shape after this many seconds
CODEGEN_S=${CODEGEN_S:-55}
XDIST_N=${XDIST_N:-4}
# The GPU parts must see the real device, never the CPU interpreter.
unset TRITON_INTERPRET SUBSPACE_OPS_BACKEND || true

START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"

# part NAME TIMEOUT LOGFILE CMD...: runs CMD under timeout (cut to the time left), output to LOGFILE
# (and the last lines to stdout), and appends "NAME rc=RC seconds=S" to summary.txt.
part() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s) - 5))  # 5 s for timeout's -k grace
    if ((left < 10)); then
        echo "== $name: skipped (${left}s left of ${TOTAL_S}s)"
        printf '%-13s rc=skipped seconds=0\n' "$name" >> "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s) -> $log"
    local t0=$(date +%s)
    { printf '$'; printf ' %q' "$@"; printf '\n'; } > "$log"
    timeout -k 5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local dt=$(($(date +%s) - t0))
    tail -n 6 "$log" | sed 's/^/   | /'
    echo "   $name rc=$rc (${dt}s)"
    printf '%-13s rc=%s seconds=%s\n' "$name" "$rc" "$dt" >> "$SUMMARY"
}

part install "$INSTALL_S" "$OUTDIR/install.txt" \
    "$PY" -m pip install --no-deps --no-build-isolation -q -e .

part env "$ENV_S" "$OUTDIR/env.txt" bash -c '
    nvidia-smi || echo "nvidia-smi failed (rc=$?)"
    "$0" -c "
import torch, triton
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO CUDA\")
"
    echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo " (dirty)")"
' "$PY"

XDIST=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then
    XDIST=(-n "$XDIST_N")
fi
part gpu_tests "$TESTS_S" "$OUTDIR/gpu-tests.txt" \
    "$PY" -m pytest -m gpu ${XDIST[@]+"${XDIST[@]}"} -q -rfE --durations=10 -p no:cacheprovider tests

part bench_target "$TARGET_S" "$OUTDIR/bench-target.log" \
    "$PY" -m bench --device cuda --target-only --json "$OUTDIR/bench-target.json" --md "$OUTDIR/bench-target.md"

part bench_rest "$REST_S" "$OUTDIR/bench-rest.log" \
    "$PY" -m bench --device cuda --no-target --time-budget "$REST_BUDGET_S" \
    --json "$OUTDIR/bench-rest.json" --md "$OUTDIR/bench-rest.md"

# CPU only (compiles for sm_90 on this machine's cores; a run cut short writes the rows it has).
part codegen "$CODEGEN_S" "$OUTDIR/codegen-sm90.log" \
    "$PY" -m bench --compile-only sm_90 --json "$OUTDIR/codegen-sm90.json" --ptx-dir "$OUTDIR/ptx"

printf '%-13s %s\n' total "seconds=$(($(date +%s) - START))" >> "$SUMMARY"
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
