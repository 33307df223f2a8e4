#!/usr/bin/env bash
# The GPU checks of moqe step by step, for a GPU machine held for longer than the lent ones (for
# those, scripts/gpu-first.sh runs everything in one prepared command). Results go to $OUT (or ./gpu-out): logs and benchmark JSON, named by
# step. The build directory persists between calls on a warm machine. On a machine without the
# build dependencies, carry them (scripts/gpu-deps.sh) and unpack them first.
#
#   bash scripts/gpu-check.sh build      # configure + build (sm_90, all CUDA targets)
#   bash scripts/gpu-check.sh test       # tests/cuda, then the whole ctest suite
#   bash scripts/gpu-check.sh sanitize   # tests/cuda under compute-sanitizer memcheck, racecheck,
#                                        # synccheck (the slow kernel-heavy cases filtered down)
#   bash scripts/gpu-check.sh bench-gemm # BM_CudaMemcpy + BM_CudaGemm (Mixtral and DeepSeek shapes)
#   bash scripts/gpu-check.sh bench-moe  # BM_CudaMemcpy + BM_CudaMoeLayer
#   bash scripts/gpu-check.sh example    # example 08 and moe-forward --device cuda
# Several steps may be given in one call: bash scripts/gpu-check.sh build test
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-out}"
build="${MOQE_GPU_BUILD:-build-gpu}"
mkdir -p "$out"
jobs=$(nproc)
# Dependencies carried in .gpu-deps (scripts/gpu-deps.sh), when the machine has none of its own.
prefix_args=()
if [ -d .gpu-deps/root/usr ]; then
  prefix_args=(-DCMAKE_PREFIX_PATH="$PWD/.gpu-deps/root/usr" -DMOQE_WITH_MPI=OFF)
  export LD_LIBRARY_PATH="$PWD/.gpu-deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
fi

step_build() {
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOQE_WITH_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DMOQE_BUILD_TESTS=ON -DMOQE_BUILD_BENCH=ON \
    -DMOQE_BUILD_EXAMPLES=ON "${prefix_args[@]}" >"$out/build.log" 2>&1 &&
    cmake --build "$build" -j "$jobs" >>"$out/build.log" 2>&1
  local rc=$?
  tail -5 "$out/build.log"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    >"$out/device.txt" 2>&1
  return $rc
}

step_test() {
  "$build/tests/moqe_cuda_tests" --durations yes >"$out/cuda-tests.log" 2>&1
  local rc=$?
  tail -4 "$out/cuda-tests.log"
  if [ -x "$build/tests/moqe_nccl_tests" ]; then
    timeout 90 "$build/tests/moqe_nccl_tests" >"$out/nccl-tests.log" 2>&1 || rc=1
    tail -4 "$out/nccl-tests.log"
  fi
  ctest --test-dir "$build" -j "$jobs" --output-on-failure >"$out/ctest.log" 2>&1 || rc=1
  tail -4 "$out/ctest.log"
  return $rc
}

step_sanitize() {
  local rc=0 t="$build/tests/moqe_cuda_tests"
  # One representative case per kernel family keeps each tool within minutes.
  local cases='cuda: quantize*,cuda gemm: M = 0*,cuda gemm_grouped*,cuda router*,cuda moe*'
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" "$cases" \
      >"$out/sanitizer-$tool.log" 2>&1 || rc=1
    echo "$tool: $(tail -1 "$out/sanitizer-$tool.log")"
  done
  return $rc
}

bench() {
  local name=$1 filter=$2
  "$build/bench/cuda/moqe_bench_cuda" --benchmark_filter="$filter" --benchmark_min_time=0.2 \
    --benchmark_out="$out/$name.json" --benchmark_out_format=json >"$out/$name.log" 2>&1
  local rc=$?
  tail -3 "$out/$name.log"
  return $rc
}
step_bench-gemm() { bench bench-gemm 'BM_CudaMemcpy|BM_CudaGemm'; }
step_bench-moe() { bench bench-moe 'BM_CudaMemcpy|BM_CudaMoeLayer'; }

step_example() {
  "$build/examples/08_cuda_moe" >"$out/example08.log" 2>&1
  local rc=$?
  cat "$out/example08.log"
  return $rc
}

rc=0
for s in "$@"; do
  declare -F "step_$s" >/dev/null || { echo "unknown step '$s'"; exit 2; }
  echo "== $s"
  t0=$(date +%s)
  "step_$s" || rc=1
  echo "== $s: $(( $(date +%s) - t0 )) s"
done
exit $rc
