#!/usr/bin/env bash
# Builds the CUDA wheel for the GPU machine ahead of time, on a machine without a GPU, so that the
# device's minutes go to running (bench/gpu/run.sh installs it from .whl-gpu/ with no compiler):
# Python 3.12 and torch 2.11.0 with CUDA 13.0 (what the H200 machine runs), sm_90a only.
#
#   bash bench/gpu/build_wheel.sh     # ~6 min on 2 cores the first time; later builds reuse build/gpu312
#
# Needs nvcc 13.x (CUDACXX, default /usr/local/cuda-13.0/bin/nvcc) and a python3.12 (PY312; pyenv's
# is found). The venv .venv-gpu312 is made once with torch 2.11.0 from the package registry and
# CUTLASS's headers (nvidia-cutlass, for the sm_90a int8 GEMM).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-gpu312"
GPU_TORCH="${GPU_TORCH:-torch==2.11.0}"
CUTLASS="$(sed -n 's/^CUTLASS ?= //p' Makefile)"  # the version the Makefile's CUDA venv pins

if [ ! -x "$VENV/bin/python" ]; then
  PY312="${PY312:-$(command -v python3.12 2>/dev/null || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n 1)}"
  [ -n "$PY312" ] || { echo "build_wheel.sh: no python3.12 found (set PY312=/path/to/python3.12)" >&2; exit 1; }
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/pip" install -q "$GPU_TORCH" scikit-build-core pybind11 ninja cmake numpy ${CUTLASS:+"$CUTLASS"}
"$VENV/bin/python" -c 'import torch; v = torch.version.cuda or ""; assert v.startswith("13."), f"torch {torch.__version__} is not a CUDA 13 build"'

rm -rf "$ROOT/.whl-gpu"
CUDACXX="${CUDACXX:-/usr/local/cuda-13.0/bin/nvcc}" "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps \
  -w "$ROOT/.whl-gpu" -C build-dir=build/gpu312 \
  -C cmake.define.TORCHSLIM_CUDA=ON -C cmake.define.TORCHSLIM_CUDA_ARCHITECTURES=90a .
# The sources the wheel was built from: run.sh builds anew where the tree it runs in differs.
bash "$ROOT/bench/gpu/source_hash.sh" >"$ROOT/.whl-gpu/SOURCE_HASH"
ls -l "$ROOT"/.whl-gpu/
