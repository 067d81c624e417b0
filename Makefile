# Everything a fresh machine needs: `make test`, `make bench`, `make demo`.
#
# All of it goes into a project-local virtual environment, $(VENV) (created by
# the first target that needs it, reused afterwards), never into the python3 on
# the PATH.  Each set-up step is a file target (a stamp), so a second `make
# test` installs and compiles nothing unless its inputs changed.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.14.1
DEPS ?= ninja "setuptools>=77" wheel pytest pytest-xdist numpy tqdm matplotlib scikit-learn safetensors $(INTEGRATIONS)
# The frameworks the integrations and drop-ins are tested against (the real
# packages, tiny models built in the tests, nothing downloaded), the peer the
# post-hoc EMA is compared with, and TensorBoard for the trainer's logs; at
# the oldest releases the integrations support.  timm needs the torchvision
# release made for TORCH_SPEC.
INTEGRATIONS ?= "lightning>=2.6" "transformers>=4.46" "accelerate>=1.0" "diffusers>=0.30" "timm>=1.0.9" torchvision==0.29.1 "ema-pytorch>=0.7" "tensorboard>=2.14"
# What the benchmark also compares against beyond INTEGRATIONS (nothing today).
BENCH_EXTRAS ?=
# `make test-torch` without TORCH_VERSION: the oldest torch release the package
# claims to support (pyproject.toml), which .ci/run tests.
TORCH_VERSION ?= 2.13.0+cpu
# One architecture keeps CI compiles short; set TORCH_CUDA_ARCH_LIST for yours.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
# The CUDA kernel is sized not to spill registers; the builds here fail when
# it does (a plain pip install only warns).
export EMA_CUDA_SPILLS_ARE_ERRORS ?= 1
# Build the CUDA kernel whenever nvcc is on the PATH (a GPU is not needed), and
# make a failure to do so an error: CI compiles the .cu file on every run.
HAVE_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
export FORCE_CUDA ?= $(HAVE_NVCC)
# The suites run on TEST_WORKERS processes (pytest-xdist); -q still prints a
# dot per test and a percentage per line.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -q -n $(TEST_WORKERS)

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := build/.extension-built
# $(call update-file,FILE,TEXT): writes TEXT to FILE only when it differs, so
# that FILE's timestamp (and what depends on it) changes only then.
update-file = echo '$(2)' | cmp -s - $(1) || echo '$(2)' > $(1)

.PHONY: all deps bench-deps build test test-compiled test-fallback test-wheel test-torch bench demo clean FORCE

all: build

# ---------------------------------------------------------------- environment

$(PYTHON):
	$(SYSTEM_PYTHON) -m venv $(VENV)

# What goes into the environment, as a file whose timestamp changes only when
# the requested packages do (e.g. `make test TORCH_SPEC=torch==2.14.0`).
$(VENV)/.deps-spec: FORCE | $(PYTHON)
	@$(call update-file,$@,$(TORCH_SPEC) $(DEPS))

$(DEPS_STAMP): $(VENV)/.deps-spec
	@echo "installing $(TORCH_SPEC) and the build and test tools into $(VENV)"
	$(PIP) install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

deps: $(DEPS_STAMP)

# ---------------------------------------------------------------- the extension

# The build settings, rewritten only when they change: a changed
# TORCH_CUDA_ARCH_LIST or FORCE_CUDA rebuilds, an unchanged one does not.
build/.build-config: FORCE
	@mkdir -p build
	@$(call update-file,$@,$(TORCH_CUDA_ARCH_LIST) $(FORCE_CUDA) $(EMA_CUDA_CPU_ONLY) $(EMA_CUDA_NO_AVX2) $(EMA_CUDA_SPILLS_ARE_ERRORS))

# In-place build, then a .pth file puts the source tree on $(VENV)'s path: the
# same as `pip install --no-build-isolation -e .`, except that pip compiles
# from scratch in a temporary directory on every call, while build_ext reuses
# the object files under build/ (ninja recompiles only what changed).
$(BUILD_STAMP): $(DEPS_STAMP) build/.build-config setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	$(PYTHON) setup.py -q build_ext --inplace
	$(PYTHON) -c 'import os, sysconfig; open(os.path.join(sysconfig.get_paths()["purelib"], "ema_cuda-source.pth"), "w").write(os.getcwd() + "\n")'
	touch $@

build: $(BUILD_STAMP)

# ---------------------------------------------------------------- tests

# The suite runs twice: against the compiled op, then against the pure-PyTorch
# fallback.  EMA_CUDA_EXPECT_CUDA makes the suite check that the CUDA kernel
# really was compiled in.  Then the wheel is built, installed and tried.
# EMA_CUDA_EXPECT_INTEGRATIONS makes a framework that does not import a
# failure instead of a skip (make test installed them all).
test: $(BUILD_STAMP)
	EMA_CUDA_BACKEND=compiled EMA_CUDA_EXPECT_CUDA=$(FORCE_CUDA) EMA_CUDA_EXPECT_INTEGRATIONS=1 $(PYTHON) -m pytest $(PYTEST_ARGS) tests
	EMA_CUDA_BACKEND=fallback EMA_CUDA_EXPECT_INTEGRATIONS=1 $(PYTHON) -m pytest $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory test-wheel

test-compiled: $(BUILD_STAMP)
	EMA_CUDA_BACKEND=compiled $(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-fallback: $(BUILD_STAMP)
	EMA_CUDA_BACKEND=fallback $(PYTHON) -m pytest $(PYTEST_ARGS) tests

# What a user gets from `pip install --no-build-isolation .`: the wheel,
# installed into a new environment, tried from outside the source tree.  The
# wheel reuses the object files of the in-place build (seconds, not minutes).
test-wheel: $(BUILD_STAMP)
	PYTHON=$(PYTHON) EXPECT_CUDA=$(FORCE_CUDA) bash tools/test_wheel.sh

# Both suites against another torch release (e.g. a GPU machine's), in an
# environment of its own: make test-torch TORCH_VERSION=2.11.0
test-torch: $(DEPS_STAMP)
	PYTHON=$(PYTHON) PYTEST_ARGS="$(PYTEST_ARGS)" bash tools/test_torch_version.sh $(TORCH_VERSION)

# ---------------------------------------------------------------- benchmark and demo

# The peers are optional: when they cannot be installed the benchmark still
# runs, says so here, and reports their rows as skipped.
bench-deps: $(DEPS_STAMP)
	$(if $(strip $(BENCH_EXTRAS)),$(PIP) install -q $(BENCH_EXTRAS) || echo "warning: could not install $(BENCH_EXTRAS); the benchmark skips their rows")

# The fused update against the usual ways, then several EMAs in one pass and
# the EMA inside each framework (benchmarks/frameworks.py).
bench: $(BUILD_STAMP) bench-deps
	$(PYTHON) -m benchmarks.bench_ema
	$(PYTHON) -m benchmarks.frameworks

demo: $(BUILD_STAMP)
	$(PYTHON) examples/train_digits.py

clean:
	rm -rf build dist *.egg-info ema_cuda/*.so ema_cuda/_build_info.py

FORCE:
