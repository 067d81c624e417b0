#!/usr/bin/env bash
# Everything a short session on a GPU machine should do, in one command:
# build the CUDA kernel, run the test suite on the GPU, run the CUDA tests
# under compute-sanitizer (memcheck, then racecheck), run the benchmarks at
# the default sizes and at 1B+ parameters.  Each stage has its own time limit,
# so that a slow stage cannot eat the others' time, and writes its log under
# the output directory; the last lines printed are a summary.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # default: $OUT, else gpu-session/ in the repository
#
# Needs: an NVIDIA GPU, a CUDA build of torch, nvcc, ninja, pytest.  Installs
# nothing from a package index (GPU machines often have none).  Environment:
#   TORCH_CUDA_ARCH_LIST  architectures to build (default 9.0: H100/H200)
#   STAGE_LIMITS          "build tests sanitizer bench bench_large" seconds
#                         (default "200 120 110 110 50": under 10 minutes in
#                         all; the sanitizer's share is split between memcheck
#                         and racecheck)
#   PYTHON                interpreter (default python3)
#   DEVICE                cuda (default), or cpu to try this script on a
#                         machine without a GPU (quick benchmarks, same stages;
#                         CPU_FORCE_CUDA=1 still requires the CUDA kernel built)
set -uo pipefail
OUT_DIR=${1:-${OUT:-$(dirname "$0")/../gpu-session}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
read -r LIMIT_BUILD LIMIT_TESTS LIMIT_SANITIZER LIMIT_BENCH LIMIT_LARGE <<<"${STAGE_LIMITS:-200 120 110 110 50}"
mkdir -p "$OUT_DIR/results"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

# stage NAME LIMIT CMD...: runs CMD under `timeout`, output to NAME.log.
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT after ${limit}s"; elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
    printf '%-12s %-28s %4ds  log: %s\n' "$name" "$verdict" $((SECONDS - t0)) "$OUT_DIR/$name.log" | tee -a "$SUMMARY"
    return $rc
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    nvcc --version 2>&1 | tail -n 2
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS nproc=$(nproc)"
} >"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

DEVICE=${DEVICE:-cuda}
export FORCE_CUDA=1  # the build must contain the CUDA kernel
if [ "$DEVICE" = cpu ]; then
    FORCE_CUDA=${CPU_FORCE_CUDA:-0}  # a CPU-only torch builds the CPU kernel only
    BENCH_ARGS=(--device cpu --quick)
    LARGE_ARGS=(--device cpu --quick --size-scale 0.6)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible to torch (DEVICE=cpu runs this script without one)" | tee -a "$SUMMARY"
        exit 1
    fi
    BENCH_ARGS=(--device "$DEVICE")
    LARGE_ARGS=(--device "$DEVICE" --size-scale 12)
fi

# The build: an editable install that fetches nothing; where pip cannot do
# that (e.g. no setuptools wheel support), an in-place build of the extension.
build() {
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . ||
        "$PYTHON" setup.py build_ext --inplace || return 1
    "$PYTHON" -c "import os, sys; from ema_cuda import ops; print('backend', ops.backend(), '| CUDA kernel compiled in:', ops.cuda_kernel_available()); sys.exit(0 if ops.backend() == 'compiled' and (ops.cuda_kernel_available() or os.environ['FORCE_CUDA'] != '1') else 1)"
}
export -f build
export PYTHON
if ! stage build "$LIMIT_BUILD" bash -c build; then
    tail -n 30 "$OUT_DIR/build.log"
    exit 1
fi

stage tests "$LIMIT_TESTS" env EMA_CUDA_BACKEND=compiled EMA_CUDA_EXPECT_CUDA="$FORCE_CUDA" \
    "$PYTHON" -m pytest -q -ra --durations=10 -p no:cacheprovider tests
# compute-sanitizer over the CUDA tests (the single and the multi-EMA op): out-of-bounds or misaligned
# accesses (memcheck) and shared-memory races (racecheck) in the kernel.  The
# >2 GiB test is left out (minutes under the sanitizer).
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ "$DEVICE" != cpu ] && [ -x "$SANITIZER" ]; then
    for tool in memcheck racecheck; do
        stage "sanitizer_$tool" $((LIMIT_SANITIZER / 2)) env EMA_CUDA_BACKEND=compiled \
            "$SANITIZER" --tool "$tool" --error-exitcode 99 --target-processes all \
            "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_ops_cuda.py tests/test_multi_ema_op.py -k "not large_tensor"
    done
else
    echo "sanitizer    skipped (no GPU or no compute-sanitizer)" | tee -a "$SUMMARY"
fi
stage bench "$LIMIT_BENCH" "$PYTHON" -m benchmarks.bench_ema "${BENCH_ARGS[@]}" --out "$OUT_DIR/results"
stage bench_large "$LIMIT_LARGE" "$PYTHON" -m benchmarks.bench_ema "${LARGE_ARGS[@]}" \
    --workloads gpt2 huge vit_b16_bf16 --no-e2e --out "$OUT_DIR/results/large"

echo
echo "== tests"
grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT_DIR/tests.log" | tail -n 25
for tool in memcheck racecheck; do
    [ -f "$OUT_DIR/sanitizer_$tool.log" ] || continue
    echo "== compute-sanitizer $tool"
    grep -E "ERROR SUMMARY|Invalid|Race|[0-9]+ (passed|failed)" "$OUT_DIR/sanitizer_$tool.log" | tail -n 12
done
for b in bench bench_large; do
    echo "== $b: goals"
    sed -n '/^## Goals/,$p' "$OUT_DIR/$b.log" | tail -n 12
done
echo "== summary"
cat "$SUMMARY"
