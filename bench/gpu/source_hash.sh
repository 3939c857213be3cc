#!/usr/bin/env bash
# Prints one hash of everything a torchslim wheel is built from (run from any directory), so that
# run.sh can tell whether the prebuilt wheel in .whl-gpu/ matches the tree it runs in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
find python csrc triton_kernels cmake CMakeLists.txt pyproject.toml -type f ! -name '*.pyc' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
