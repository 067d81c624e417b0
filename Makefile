# Everything a fresh machine needs: `make test`, `make bench`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.14.1
# What the benchmark also compares against: timm's ModelEmaV3 (timm needs the
# torchvision release made for TORCH_SPEC).
BENCH_EXTRAS ?= timm torchvision==0.29.1
# One architecture keeps CI compiles short; set TORCH_CUDA_ARCH_LIST for yours.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
# Build the CUDA kernel whenever nvcc is on the PATH (a GPU is not needed), and
# make a failure to do so an error: CI compiles the .cu file on every run.
HAVE_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
export FORCE_CUDA ?= $(HAVE_NVCC)
PYTEST_ARGS ?= -q

.PHONY: all deps bench-deps build test test-compiled test-fallback test-torch bench demo clean

all: build

deps:
	$(PIP) install -q "$(TORCH_SPEC)" ninja "setuptools>=64" wheel pytest numpy tqdm matplotlib scikit-learn

build: deps
	$(PIP) install -q --no-build-isolation -e .

# The suite runs twice: against the compiled op, then against the pure-PyTorch
# fallback.  EMA_CUDA_EXPECT_CUDA makes the suite check that the CUDA kernel
# really was compiled in.
test: build
	EMA_CUDA_BACKEND=compiled EMA_CUDA_EXPECT_CUDA=$(FORCE_CUDA) $(PYTHON) -m pytest $(PYTEST_ARGS) tests
	EMA_CUDA_BACKEND=fallback $(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-compiled:
	EMA_CUDA_BACKEND=compiled $(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-fallback:
	EMA_CUDA_BACKEND=fallback $(PYTHON) -m pytest $(PYTEST_ARGS) tests

# Both suites against another torch release (e.g. a GPU machine's), in an
# environment of its own: make test-torch TORCH_VERSION=2.11.0
test-torch:
	bash tools/test_torch_version.sh $(TORCH_VERSION)

# The peers are optional: when they cannot be installed the benchmark still
# runs, says so here, and reports their rows as skipped.
bench-deps: deps
	$(PIP) install -q $(BENCH_EXTRAS) || echo "warning: could not install $(BENCH_EXTRAS); the benchmark skips timm ModelEmaV3"

bench: build bench-deps
	$(PYTHON) -m benchmarks.bench_ema

demo: build
	$(PYTHON) examples/train_digits.py

clean:
	rm -rf build *.egg-info ema_cuda/*.so
