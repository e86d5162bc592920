# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# .venv (reusing an installed torch through --system-site-packages), install torch==2.13.0 only if
# none is importable, and build the extension against it without build isolation.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_ENV   := $(VENV)/.env-stamp
STAMP_BUILD := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt pyproject.toml
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: all env build install demo test test-cuda-compile bench lint clean

all: build

$(STAMP_ENV): Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q "scikit-build-core>=0.10" ninja cmake "pytest>=8" expecttest numpy "safetensors>=0.4" \
	    "transformers>=5.0,<6" "accelerate>=1.0" matplotlib
	touch $@

env: $(STAMP_ENV)

$(STAMP_BUILD): $(STAMP_ENV) $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(STAMP_BUILD)

# Install into the environment of $(PYTHON) itself (no .venv): torch first (kept when one is
# importable, so a CUDA build is reused), the build tools, then the package without build isolation
# (an isolated build would not see that torch). `make install PYTHON=/path/to/python`.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install "scikit-build-core>=0.10" ninja cmake
	$(PYTHON) -m pip install --no-build-isolation .

demo: build
	$(PY) -m moestream.bench

test: build test-cuda-compile
	$(PY) -m pytest -q -ra tests

# Compile every CUDA kernel file (they include no torch headers) for sm_80 and sm_90a, so a CUDA
# error is caught without a GPU.
test-cuda-compile:
	@PYTHON=$(PY) bash scripts/check_cuda_compile.sh

bench: build
	$(PY) -m moestream.bench --suite all

clean:
	rm -rf build $(VENV)
