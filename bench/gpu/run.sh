#!/usr/bin/env bash
# The GPU run: one call on a machine with an NVIDIA GPU (offline; the H200 machine has torch 2.11 +
# CUDA 13.0, triton, pytest, hypothesis and pytest-xdist installed), sized for one device call of at
# most 8 minutes (each step has a time limit; they add up to 570 s at worst, ~6 min expected):
#   1. install torchslim: the prebuilt wheel in .whl-gpu/ (bench/gpu/build_wheel.sh makes it on a
#      machine without a GPU, against the GPU machine's torch), else build here (fallback, ~3 min),
#   2. .ci/cuda_smoke.py, 3. the tests marked gpu, then the rest of the suite, both in parallel
#      workers with the quick hypothesis profile and Triton's autotuning cut to one config per call kind,
#   4. the GPU's ceilings (bench/gpu/ceilings.py), then the benchmarks of every op against its GPU anchors (int8, 2:4, CSR, low rank; each starts no new
#      case past its time budget). Their tables are printed last.
# Logs and the benchmark JSON go to $RESULTS (default bench/results/h200) and, flat, to $OUT when set.
# A failing step does not stop the later ones; the exit status is non-zero if any step failed.
#
#   bash bench/gpu/run.sh                     # everything
#   QUICK=1 bash bench/gpu/run.sh             # benchmarks on two shapes only
#   SKIP_TESTS=1 bash bench/gpu/run.sh        # install, smoke test and benchmarks only
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
RESULTS="${RESULTS:-$ROOT/bench/results/h200}"
mkdir -p "$RESULTS"
status=0
summary=()
T_START=$SECONDS

note() { echo "[run.sh +$((SECONDS - T_START))s] $*"; }
keep() { [ -n "${OUT:-}" ] && cp -f "$@" "$OUT/" 2>/dev/null; true; }
export PYTHONUNBUFFERED=1

note "python: $PY"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| triton", triton.__version__, "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader

# ---- 1. install --------------------------------------------------------------------------------
# The wheel must match this Python (cp312 on the H200 machine); the import check below catches a
# wheel built against another torch (an undefined symbol) and falls back to building here.
installed=""
pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
for whl in "$ROOT"/.whl-gpu/torchslim-*-"$pytag"-*.whl; do
  [ -e "$whl" ] || continue
  if [ "$(cat "$ROOT/.whl-gpu/SOURCE_HASH" 2>/dev/null)" != "$(bash "$ROOT/bench/gpu/source_hash.sh")" ]; then
    note "the prebuilt wheel was built from other sources than this tree (.whl-gpu/SOURCE_HASH); building instead"
    break
  fi
  note "installing the prebuilt wheel $(basename "$whl")"
  if "$PY" -m pip install -q --no-deps --no-index --force-reinstall "$whl" >"$RESULTS/install.log" 2>&1 &&
     (cd /tmp && "$PY" -c 'import torchslim; assert torchslim._C.cuda, "a CPU-only wheel"') >>"$RESULTS/install.log" 2>&1; then
    installed="wheel $(basename "$whl")"
  else
    tail -n 20 "$RESULTS/install.log"
    note "the prebuilt wheel does not work here; building instead"
  fi
  break
done
if [ -z "$installed" ]; then
  # --no-build-isolation: build against the torch that runs the code; --no-index/--no-deps: offline.
  # Only the H200's architecture is compiled, to keep the build short.
  if [ -z "${CUDA_PATH:-}${CUDA_HOME:-}${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_PATH=/usr/local/cuda
  fi
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  note "building torchslim (log: $RESULTS/install.log)"
  timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . \
    -C "cmake.define.TORCHSLIM_CUDA=ON" -C "cmake.define.TORCHSLIM_CUDA_ARCHITECTURES=90a" \
    >"$RESULTS/install.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    keep "$RESULTS/install.log"
    tail -n 60 "$RESULTS/install.log"
    note "BUILD FAILED (rc=$rc); nothing else can run"
    exit 1
  fi
  installed="built here"
fi
summary+=("install: $installed ($((SECONDS - T_START)) s)")
# From outside the source tree, so that the installed package (with _C) is what gets imported.
(cd /tmp && "$PY" -c 'import torchslim, torchslim._info as i; print(i.format_info(torchslim.info()))') | tee "$RESULTS/info.txt"
keep "$RESULTS/info.txt"

# ---- 2. smoke test ------------------------------------------------------------------------------
note "CUDA smoke test"
t0=$SECONDS
(cd "$ROOT/.ci" && timeout 60 "$PY" cuda_smoke.py) 2>&1 | tail -n 15
rc=${PIPESTATUS[0]}
summary+=("smoke: rc=$rc ($((SECONDS - t0)) s)")
[ $rc -eq 0 ] || status=1

# ---- 3. tests -----------------------------------------------------------------------------------
# Parallel workers where pytest-xdist exists (Triton compiles on the CPU: workers overlap them);
# two OpenMP threads each, so the CPU tests of 8 workers do not oversubscribe 16 cores. -v: each
# result is a line as it happens, so a step cut by its time limit still names its failures.
xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
run_tests() {  # name, time limit, pytest args...
  local name=$1 limit=$2
  shift 2
  note "pytest $* (log: $RESULTS/tests.log)"
  local t0=$SECONDS
  echo "===== $name: pytest $*" >>"$RESULTS/tests.log"
  (cd "$ROOT/tests" && OMP_NUM_THREADS=2 TORCHSLIM_TEST_PROFILE=quick TORCHSLIM_TRITON_AUTOTUNE=0 \
    timeout "$limit" "$PY" -m pytest -v -p no:cacheprovider -rfEs ${xdist[@]+"${xdist[@]}"} "$@") \
    >"$RESULTS/$name.part" 2>&1
  local rc=$?
  cat "$RESULTS/$name.part" >>"$RESULTS/tests.log" && mv -f "$RESULTS/$name.part" "$RESULTS/$name.log"
  keep "$RESULTS/tests.log"
  local last
  last=$(grep -E "[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s" "$RESULTS/$name.log" | tail -n 1)
  [ $rc -eq 124 ] && last="TIMED OUT after ${limit} s; $last"
  summary+=("$name: $last ($((SECONDS - t0)) s)")
  [ $rc -eq 0 ] || status=1
}
if [ -z "${SKIP_TESTS:-}" ]; then
  rm -f "$RESULTS/tests.log"
  run_tests gpu_tests 90 -m gpu
  grep -E "(FAILED|ERROR) " "$RESULTS/tests.log" | sort -u | head -n 40
  run_tests other_tests 100 -m "not gpu"
  grep -E "(FAILED|ERROR) " "$RESULTS/tests.log" | sort -u | head -n 60
fi

# ---- 4. benchmarks ------------------------------------------------------------------------------
note "ceilings (copy bandwidth, cuBLAS bf16 and _int_mm at 8192^3)"
(cd /tmp && timeout 30 "$PY" "$ROOT/bench/gpu/ceilings.py" --out "$RESULTS/ceilings_gpu.json") 2>&1 | tail -n 5
bench_args=()
[ -n "${QUICK:-}" ] && bench_args+=(--quick)
bench() {  # name, time limit, budget for new cases
  local name=$1 limit=$2 budget=$3
  note "$name GPU benchmark"
  local t0=$SECONDS
  (cd /tmp && timeout "$limit" "$PY" "$ROOT/bench/gpu/bench_${name}_gpu.py" ${bench_args[@]+"${bench_args[@]}"} \
    --budget-s "$budget" --out "$RESULTS/${name}_gpu.json") 2>&1 | tee "$RESULTS/bench_${name}.log"
  local rc=${PIPESTATUS[0]}
  summary+=("bench $name: rc=$rc ($((SECONDS - t0)) s)")
  [ $rc -eq 0 ] || status=1
}
bench int8_linear 75 45
bench sparse24_linear 75 40
bench csr_linear 60 35
bench lowrank_linear 60 35

echo
note "summary"
for line in "${summary[@]}"; do echo "  $line"; done
echo
# The tables of ratios again, so that they are the last thing this script prints.
for name in int8_linear sparse24_linear csr_linear lowrank_linear; do
  log="$RESULTS/bench_${name}.log"
  if grep -q "^$name on " "$log"; then
    sed -n "/^$name on /,\$p" "$log"
  else
    tail -n 20 "$log"
  fi
  echo
done
exit $status
