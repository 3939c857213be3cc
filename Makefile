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

.PHONY: venv install test demo bench cuda-venv cuda-check sanitize clean

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

clean:
	rm -rf build $(VENV) $(CUDA_VENV) $(ASAN_VENV)

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
