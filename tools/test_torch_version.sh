#!/usr/bin/env bash
# Runs both test suites against another torch release than the one installed,
# e.g. the torch of a GPU machine (2.11.0 there), without touching the
# current environment: a virtual environment that sees the installed packages
# but has its own torch, a copy of the committed tree, an in-place build.
#
#   bash tools/test_torch_version.sh 2.11.0          # or: make test-torch TORCH_VERSION=2.11.0
#   bash tools/test_torch_version.sh 2.13.0+cpu
#
# The environment is kept in $WORK (default /tmp/ema_cuda-torch-<version>) and
# reused by later runs.  It sees $PYTHON's packages (default python3; `make
# test-torch` passes the project's .venv) after its own.  With a CUDA build of
# torch and nvcc on the PATH the CUDA kernel is compiled too (for
# TORCH_CUDA_ARCH_LIST, default 9.0); with a CPU-only torch only the CPU kernel
# is built, whatever FORCE_CUDA the caller has set.  PYTEST_ARGS (default -q)
# are passed to both suites (`make test-torch` runs them on 2 processes).
set -euo pipefail
VERSION=${1:?usage: $0 TORCH_VERSION (e.g. 2.11.0)}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/ema_cuda-torch-$VERSION}
PYTEST_ARGS=${PYTEST_ARGS:--q}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
case "$PYTHON" in /*) ;; */*) PYTHON=$REPO/$PYTHON ;; esac

# $PYTHON's packages (numpy, pytest, CUDA runtime wheels...) serve both
# environments: this one has only its own torch.
bash "$REPO/tools/overlay_venv.sh" "$PYTHON" "$WORK/venv"
VPY="$WORK/venv/bin/python"
if [ "$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" != "$VERSION" ]; then
    "$PYTHON" -m pip --python "$VPY" install -q --no-deps --ignore-installed "torch==$VERSION"
fi

rm -rf "$WORK/src" && mkdir -p "$WORK/src"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/src"
cd "$WORK/src"
if "$VPY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' && command -v nvcc >/dev/null; then
    export FORCE_CUDA=1 EMA_CUDA_CPU_ONLY=0
    EXPECT_CUDA=1
else
    # A FORCE_CUDA=1 inherited from the caller (the Makefile exports it when
    # nvcc is found) contradicts a CPU-only torch: setup.py would refuse.
    export FORCE_CUDA=0 EMA_CUDA_CPU_ONLY=1
    EXPECT_CUDA=0
fi
"$VPY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log"; exit 1; }
"$VPY" -c "import torch, ema_cuda; from ema_cuda import ops; print('torch', torch.__version__, '| backend', ops.backend(), '| CUDA kernel', ops.cuda_kernel_available())"
# The frameworks the integrations are tested with (Lightning, transformers,
# timm...) are $PYTHON's, installed for its torch: beside another release
# they need not work (torchvision 0.29.1, which they load, does not import
# beside torch 2.13), so their tests are off here; `make test` runs them.
export EMA_CUDA_SKIP_INTEGRATIONS=1
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
EMA_CUDA_BACKEND=compiled EMA_CUDA_EXPECT_CUDA=$EXPECT_CUDA "$VPY" -m pytest $PYTEST_ARGS -p no:cacheprovider tests
# shellcheck disable=SC2086
EMA_CUDA_BACKEND=fallback "$VPY" -m pytest $PYTEST_ARGS -p no:cacheprovider tests
