#!/usr/bin/env bash
# Builds the wheel a user gets from `pip install --no-build-isolation .`,
# installs it into a new virtual environment and runs tools/wheel_smoke.py
# there, from a directory outside the source tree, so that nothing can come
# from the checkout by accident (a subpackage missing from the wheel, a file
# only the source tree has).
#
#   bash tools/test_wheel.sh          # or: make test-wheel
#
# The new environment sees $PYTHON's packages (torch, numpy, scikit-learn...)
# after its own (tools/overlay_venv.sh): only ema_cuda comes from the wheel.
# With EXPECT_CUDA=1 the wheel must contain the CUDA kernel.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
case "$PYTHON" in /*) ;; */*) PYTHON=$REPO/$PYTHON ;; esac
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ema_cuda-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

cd "$REPO"
echo "test-wheel: building the wheel"
# pip builds in the source tree, and setuptools packs whatever build/lib.* holds
# and whatever an earlier build listed in *.egg-info/SOURCES.txt, also files the
# current configuration would leave out: start from neither, as a fresh clone
# would.  The object files (build/temp.*) stay: the wheel links them instead of
# compiling them again.
rm -rf build/lib.* build/bdist.* ./*.egg-info
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
bash "$REPO/tools/overlay_venv.sh" "$PYTHON" "$WORK/venv"
VPY=$WORK/venv/bin/python
"$PYTHON" -m pip --python "$VPY" install -q --no-deps --ignore-installed "$WORK"/dist/ema_cuda-*.whl

mkdir "$WORK/cwd" && cd "$WORK/cwd"
echo "test-wheel: smoke test of $(basename "$WORK"/dist/ema_cuda-*.whl) in a new environment, from $PWD"
EMA_CUDA_BACKEND=compiled "$VPY" "$REPO/tools/wheel_smoke.py" --repo "$REPO" --expect-cuda "${EXPECT_CUDA:-0}"
