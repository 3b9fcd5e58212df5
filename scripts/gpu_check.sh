#!/usr/bin/env bash
# Every GPU-only check in one go, for a lent GPU machine (see docs/kernels.md): compiled kernels
# against the references, the @pytest.mark.gpu tests, the benchmark, a per-kernel profile of
# batch-1 decode steps, and a sweep of launch configurations (rms_norm_linear, then attention).
# Logs and the benchmark's markdown section go to $OUT. Every step runs
# even when an earlier one fails; the exit status is 1 if any failed. Time limits per step
# (seconds) come from KERNEL_TESTS_S, GPU_TESTS_S, BENCH_S, PROFILE_S and SWEEP_S; the defaults
# add up to 580 s, under a lent machine's 600 s per command.
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# The CPU path in test_gpu.py's comparison runs plain torch (no C++ build on this machine).
export PYTHONUNBUFFERED=1 PAGEDSERVE_CPU_KERNEL=0
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
$PY -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', t.__version__, torch.cuda.get_device_name())"
FAILED=""
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - t0))s"
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
}
step kernels "${KERNEL_TESTS_S:-120}" $PY -m pytest -q -p no:cacheprovider $XDIST \
  tests/test_kernels.py tests/test_kernels_model.py
step gpu_tests "${GPU_TESTS_S:-100}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
step bench "${BENCH_S:-240}" $PY -m benchmarks.gpu_bench --output "$OUT/bench.md" ${BENCH_ARGS:-}
step profile "${PROFILE_S:-60}" $PY -m benchmarks.gpu_bench --profile
step sweep "${SWEEP_S:-60}" $PY -m benchmarks.gpu_bench --sweep
if [ -n "$FAILED" ]; then
  echo "failed:$FAILED"
  exit 1
fi
