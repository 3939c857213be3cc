# The README's quick start: `make demo` and `make test`, each from a fresh clone.
# Torch extensions build against the installed torch (--no-build-isolation): the venv gets the
# CPU torch first, then torchslim is compiled against exactly that torch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
BUILD_DEPS := scikit-build-core pybind11 ninja cmake numpy

.PHONY: venv install test demo bench cuda-check clean

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

clean:
	rm -rf build $(VENV)
