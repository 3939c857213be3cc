#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU (offline; torch, triton, nvcc, cmake, ninja,
# scikit-build-core, pybind11, pytest and hypothesis already installed):
#   1. build and install torchslim with its CUDA kernels against the installed torch,
#   2. the GPU tests (pytest -m gpu), then the rest of the suite (-m "not gpu"),
#   3. the int8_linear GPU benchmark, 4. the sparse24_linear GPU benchmark, 5. the csr_linear GPU
#      benchmark, 6. the lowrank_linear GPU benchmark; their tables of ratios are the last things printed.
# Logs and the benchmark JSON go to bench/results/ and, when $OUT is set, to $OUT as well.
# A failing test step does not stop the benchmark; the exit status is non-zero if any step failed.
#
#   bash bench/gpu/run.sh            # ~10-11 min on an H200 (steps have time limits: 18 min at most;
#                                    # the sparse24 and csr benchmarks start no new case after 90 s,
#                                    # the lowrank one after 60 s)
#   QUICK=1 bash bench/gpu/run.sh    # benchmarks on two shapes only
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
LOGS="$ROOT/bench/results/gpu_run"
mkdir -p "$LOGS"
status=0
summary=()

note() { echo "[run.sh $(date +%H:%M:%S)] $*"; }
keep() { [ -n "${OUT:-}" ] && mkdir -p "$OUT/gpu_run" && cp -f "$@" "$OUT/gpu_run/" 2>/dev/null; true; }

note "python: $PY"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| triton", triton.__version__, "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader

# ---- 1. build ---------------------------------------------------------------------------------
# --no-build-isolation: build against the torch that runs the code; --no-index/--no-deps: offline.
# Only the H200's architecture is compiled here, to keep the build short.
if [ -z "${CUDA_PATH:-}${CUDA_HOME:-}${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_PATH=/usr/local/cuda
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
note "building torchslim (log: $LOGS/build.log)"
t0=$SECONDS
timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
  -C "cmake.define.TORCHSLIM_CUDA=${TORCHSLIM_CUDA:-ON}" \
  -C "cmake.define.TORCHSLIM_CUDA_ARCHITECTURES=${TORCHSLIM_CUDA_ARCHITECTURES:-90a}" \
  >"$LOGS/build.log" 2>&1
rc=$?
keep "$LOGS/build.log"
if [ $rc -ne 0 ]; then
  tail -n 60 "$LOGS/build.log"
  note "BUILD FAILED (rc=$rc); nothing else can run"
  exit 1
fi
summary+=("build: ok in $((SECONDS - t0)) s")
# Run from outside the source tree so that the installed package (with _C) is what gets imported.
(cd /tmp && "$PY" -c 'import torchslim, torchslim._info as i; print(i.format_info(torchslim.info()))') \
  | tee "$LOGS/info.txt"
keep "$LOGS/info.txt"

# ---- 2. tests ---------------------------------------------------------------------------------
run_tests() {  # name, timeout, pytest args...
  local name=$1 limit=$2
  shift 2
  note "pytest $* (log: $LOGS/$name.log)"
  local t0=$SECONDS
  (cd "$ROOT/tests" && timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider -rfEs "$@") >"$LOGS/$name.log" 2>&1
  local rc=$?
  keep "$LOGS/$name.log"
  grep -E "^(FAILED|ERROR)" "$LOGS/$name.log" | head -n 30
  local last
  last=$(tail -n 1 "$LOGS/$name.log")
  [ $rc -eq 124 ] && last="TIMED OUT after ${limit} s; $last"
  summary+=("$name: $last ($((SECONDS - t0)) s)")
  [ $rc -eq 0 ] || status=1
}
run_tests gpu_tests 180 -m gpu
run_tests other_tests 120 -m "not gpu"

# ---- 3. benchmark -----------------------------------------------------------------------------
note "int8_linear GPU benchmark"
bench_args=()
[ -n "${QUICK:-}" ] && bench_args+=(--quick)
(cd /tmp && timeout 180 "$PY" "$ROOT/bench/gpu/bench_int8_linear_gpu.py" ${bench_args[@]+"${bench_args[@]}"} \
  --out "$ROOT/bench/results/int8_linear_gpu.json") 2>&1 | tee "$LOGS/bench.log"
rc=${PIPESTATUS[0]}
keep "$LOGS/bench.log"
[ $rc -eq 0 ] || status=1

# ---- 4. sparse24 benchmark --------------------------------------------------------------------
note "sparse24_linear GPU benchmark"
(cd /tmp && timeout 120 "$PY" "$ROOT/bench/gpu/bench_sparse24_linear_gpu.py" ${bench_args[@]+"${bench_args[@]}"} \
  --budget-s 90 --out "$ROOT/bench/results/sparse24_linear_gpu.json") 2>&1 | tee "$LOGS/bench_sparse24.log"
rc24=${PIPESTATUS[0]}
keep "$LOGS/bench_sparse24.log"
[ $rc24 -eq 0 ] || status=1

# ---- 5. csr benchmark -------------------------------------------------------------------------
note "csr_linear GPU benchmark"
(cd /tmp && timeout 150 "$PY" "$ROOT/bench/gpu/bench_csr_linear_gpu.py" ${bench_args[@]+"${bench_args[@]}"} \
  --budget-s 90 --out "$ROOT/bench/results/csr_linear_gpu.json") 2>&1 | tee "$LOGS/bench_csr.log"
rccsr=${PIPESTATUS[0]}
keep "$LOGS/bench_csr.log"
[ $rccsr -eq 0 ] || status=1

# ---- 6. lowrank benchmark ---------------------------------------------------------------------
note "lowrank_linear GPU benchmark"
(cd /tmp && timeout 90 "$PY" "$ROOT/bench/gpu/bench_lowrank_linear_gpu.py" ${bench_args[@]+"${bench_args[@]}"} \
  --budget-s 60 --out "$ROOT/bench/results/lowrank_linear_gpu.json") 2>&1 | tee "$LOGS/bench_lowrank.log"
rclr=${PIPESTATUS[0]}
keep "$LOGS/bench_lowrank.log"
[ $rclr -eq 0 ] || status=1

echo
note "summary"
for line in "${summary[@]}"; do echo "  $line"; done
[ $rc -eq 0 ] || echo "  bench: FAILED (rc=$rc)"
[ $rc24 -eq 0 ] || echo "  bench sparse24: FAILED (rc=$rc24)"
[ $rccsr -eq 0 ] || echo "  bench csr: FAILED (rc=$rccsr)"
[ $rclr -eq 0 ] || echo "  bench lowrank: FAILED (rc=$rclr)"
echo
# The tables of ratios again, so that they are the last thing this script prints.
for log in "$LOGS/bench.log:int8_linear" "$LOGS/bench_sparse24.log:sparse24_linear" "$LOGS/bench_csr.log:csr_linear" \
           "$LOGS/bench_lowrank.log:lowrank_linear"; do
  file=${log%%:*}
  name=${log##*:}
  if grep -q "^$name on " "$file"; then
    sed -n "/^$name on /,\$p" "$file"
  else
    tail -n 30 "$file"
  fi
  echo
done
exit $status
