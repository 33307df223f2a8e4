#!/usr/bin/env bash
# The first run of moqe's CUDA component on a lent GPU machine, as ONE command that fits the
# device tool's limits (10 minutes a command, ~15 minutes of GPU time in all, the machine's start
# included; no network there; at most 8 files come back from $OUT). docs/gpu.md, "The first run".
#
# Here (no GPU needed):
#   bash scripts/gpu-first.sh prepare
#     builds build-gpu/ (Release, sm_90, -lineinfo, ptxas register report), copies the binaries,
#     the shared libraries they need that a GPU image without Debian's -dev packages lacks, and
#     the register report into .gpu-carry/ (git-ignored, < 64 MiB), then rehearses `run` up to
#     the "no device" point (every binary loads and fails for lack of a GPU, not of a library).
# On the GPU machine (device tool: command "bash scripts/gpu-first.sh run", carry
# [".gpu-carry"], timeout_s 540):
#   bash scripts/gpu-first.sh run
#     probe; CUDA tests (all but NCCL) with MOQE_REQUIRE_GPU=1, where a SKIPPED test is a
#     failure; NCCL's tests alone under a timeout; example 08 at its small size; compute-sanitizer
#     memcheck on a narrow filter and racecheck on the grouped GEMM and dispatch ("unsupported"
#     where the sanitizer cannot attach, not a failure); short benchmarks; then $OUT/summary.txt
#     (the table to read first) and $OUT/results.tar.gz (every log, the benchmark JSON, the
#     register report). Every step has its own timeout; the whole run ends within ~8 minutes.
#     Exit 0 only when the tests passed with nothing skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
build="${MOQE_GPU_BUILD:-build-gpu}"
bins=(moqe_cuda_tests moqe_nccl_tests moqe_bench_cuda 08_cuda_moe moqe)

# --- here -----------------------------------------------------------------------------------

prepare() {
  set -e
  command -v nvcc >/dev/null || { echo "gpu-first: nvcc is needed to prepare"; exit 2; }
  bash scripts/install-deps.sh
  MOQE_BUILD_DIR="$build" bash scripts/configure.sh -DMOQE_WITH_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DMOQE_BUILD_TESTS=ON -DMOQE_BUILD_BENCH=ON \
    -DMOQE_BUILD_EXAMPLES=ON -DMOQE_WITH_MPI=OFF \
    "-DCMAKE_CUDA_FLAGS=-lineinfo -Xptxas=-v" >/dev/null
  # ptxas prints its register report while compiling: rebuild the CUDA objects to capture it.
  find "$build/cuda" -name '*.cu.o' -delete 2>/dev/null || true
  cmake --build "$build" --target moqe_cuda_tests moqe_nccl_tests moqe_bench_cuda 08_cuda_moe \
    moqe_cli -- -j"$(nproc)" 2>&1 | tee "$build/gpu-build.log" | grep -E "error|FAILED" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu-first: build failed ($build/gpu-build.log)"; exit 1; }
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/lib" "$carry/lib-fallback"
  for b in "${bins[@]}"; do
    local f
    f=$(find "$build" -type f -name "$b" -perm -u+x | head -1)
    [ -n "$f" ] || { echo "gpu-first: $b was not built"; exit 1; }
    strip --strip-debug -o "$carry/bin/$b" "$f"
  done
  # ptxas's report: one line per kernel of registers, shared memory, spills.
  grep -E "ptxas info|bytes stack frame|spill" "$build/gpu-build.log" >"$carry/ptxas.txt" || true
  # Shared libraries: everything the binaries load that is not libc's, the driver's or CUDA's
  # own (those come from the GPU image); libstdc++ and libgcc_s only as a fallback (the image's
  # are newer, and a copy of ours would shadow them for every tool).
  for b in "${bins[@]}"; do
    ldd "$carry/bin/$b" | awk '/=> \// {print $1, $3}'
  done | sort -u | while read -r name path; do
    case "$name" in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|linux-vdso*) ;;
      libcuda.so*|libcudart.so*|libcublas*|libnccl*|libnvidia*) ;;
      libstdc++.so*|libgcc_s.so*) cp -L "$path" "$carry/lib-fallback/" ;;
      *) cp -L "$path" "$carry/lib/" ;;
    esac
  done
  # The CUDA runtime this was linked against (small), in case the image's differs.
  cp -L "$(ldd "$carry/bin/moqe_cuda_tests" | awk '/libcudart/ {print $3}')" "$carry/lib/" \
    2>/dev/null || true
  git rev-parse HEAD >"$carry/commit.txt"
  git status --short | head -20 >>"$carry/commit.txt"
  local size
  size=$(du -sm "$carry" | cut -f1)
  echo "gpu-first: $carry is ${size} MiB (with the working tree, at most 64 MiB travel)"
  du -sh "$carry"/* | sed 's/^/  /'
  rehearse
}

# The carried binaries run here up to the point where they need a GPU.
rehearse() {
  set +e
  export LD_LIBRARY_PATH="$PWD/$carry/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  local rc=0
  for b in "${bins[@]}"; do
    if ldd "$carry/bin/$b" | grep -q "not found"; then
      echo "rehearse: $b misses a library:"; ldd "$carry/bin/$b" | grep "not found"; rc=1
    fi
  done
  MOQE_REQUIRE_GPU=1 MOQE_TEST_DATA="$PWD/tests/data" "$carry/bin/moqe_cuda_tests" \
    "cuda: device buffers check their sizes" >/tmp/gpu-first-rehearse.log 2>&1
  if [ $? -ne 0 ] && grep -q "MOQE_REQUIRE_GPU=1, but no CUDA device is usable" \
    /tmp/gpu-first-rehearse.log; then
    echo "rehearse: moqe_cuda_tests fails without a GPU under MOQE_REQUIRE_GPU=1, as it must"
  else
    echo "rehearse: moqe_cuda_tests did not fail as expected:"; tail -5 /tmp/gpu-first-rehearse.log
    rc=1
  fi
  "$carry/bin/moqe_cuda_tests" --list-test-names-only | grep -c "^cuda\|^nccl" |
    sed 's/^/rehearse: test cases in moqe_cuda_tests: /'
  "$carry/bin/moqe_nccl_tests" --list-test-names-only | grep -c "^nccl" |
    sed 's/^/rehearse: test cases in moqe_nccl_tests: /'
  MOQE_REQUIRE_GPU=1 "$carry/bin/08_cuda_moe" --small; echo "rehearse: example 08 exit $?"
  MOQE_REQUIRE_GPU=1 "$carry/bin/moqe_bench_cuda" --benchmark_list_tests=true | tail -1
  echo "rehearse: moqe_bench_cuda exit $? (1: no device, as it must)"
  "$carry/bin/moqe" --version >/dev/null 2>&1 || "$carry/bin/moqe" --help | head -1
  return $rc
}

# --- there ----------------------------------------------------------------------------------

run() {
  local out="${OUT:-$PWD/gpu-out}" logs
  logs=$(mktemp -d /tmp/moqe-gpu-XXXXXX)
  mkdir -p "$out"
  local t_start
  t_start=$(date +%s)
  local summary="$logs/summary.txt"
  note() { echo "$*" | tee -a "$summary"; }
  # Where the image keeps CUDA's libraries: the toolkit, and the pip packages beside PyTorch.
  local libdirs="$PWD/$carry/lib" d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
    [ -d "$d" ] && libdirs="$libdirs:$d"
  done
  export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
  local b missing=0
  for b in "${bins[@]}"; do
    if ldd "$carry/bin/$b" 2>&1 | grep -q "GLIBCXX.*not found\|libstdc++.*not found"; then
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PWD/$carry/lib-fallback"
    fi
  done
  for b in "${bins[@]}"; do
    ldd "$carry/bin/$b" >"$logs/ldd-$b.txt" 2>&1
    if grep -q "not found" "$logs/ldd-$b.txt"; then
      missing=1
      note "ldd: $b misses $(grep 'not found' "$logs/ldd-$b.txt" | awk '{print $1}' | tr '\n' ' ')"
    fi
  done
  export MOQE_REQUIRE_GPU=1 MOQE_TEST_DATA="$PWD/tests/data"

  note "== probe"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader >"$logs/gpu.txt" 2>&1
  nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
  note "gpu: $(head -1 "$logs/gpu.txt")"
  note "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  note "kernel: $(uname -r)"
  note "built from: $(head -1 "$carry/commit.txt")"
  [ $missing -eq 0 ] || note "some binaries miss libraries: see ldd-*.txt"

  local failed=0 skipped=0
  # The whole run stays inside MOQE_GPU_BUDGET seconds (default 470, under the 540 s the call is
  # given): each step's timeout is cut to what is left, and a step with under 15 s left is skipped.
  local budget="${MOQE_GPU_BUDGET:-470}"
  step() {  # name, seconds, command...: runs with a timeout, logs to $logs/<name>.log
    local name=$1 secs=$2; shift 2
    local t0 rc left
    t0=$(date +%s)
    left=$(( budget - (t0 - t_start) ))
    [ "$secs" -le "$left" ] || secs=$left
    if [ "$secs" -lt 15 ]; then
      echo "out of time: skipped" >"$logs/$name.log"
      echo "125 0"
      return
    fi
    timeout --kill-after=5 "$secs" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - t0 ))"
  }

  note "== cuda tests (all but NCCL; MOQE_REQUIRE_GPU=1)"
  read -r rc secs < <(step cuda-tests 150 "$carry/bin/moqe_cuda_tests" --durations yes \
    --reporter console)
  local line
  line=$(grep -E "^(All tests passed|test cases:)" "$logs/cuda-tests.log" | tail -2 | tr '\n' ' ')
  skipped=$(grep -c "SKIPPED" "$logs/cuda-tests.log")
  note "moqe_cuda_tests: exit $rc in ${secs} s; ${line:-no summary}; SKIPPED lines: $skipped"
  [ "$rc" -eq 0 ] && [ "$skipped" -eq 0 ] || failed=1
  grep -E "FAILED|SKIPPED|error" "$logs/cuda-tests.log" | head -20 >>"$summary"

  note "== nccl (alone, under a 45 s timeout)"
  read -r rc secs < <(NCCL_DEBUG=WARN step nccl-tests 45 "$carry/bin/moqe_nccl_tests")
  line=$(grep -E "^(All tests passed|test cases:)" "$logs/nccl-tests.log" | tail -2 | tr '\n' ' ')
  note "moqe_nccl_tests: exit $rc in ${secs} s (124: timed out, 125: no time left); ${line:-no summary}"
  [ "$rc" -eq 0 ] || failed=1

  note "== example 08 (small)"
  read -r rc secs < <(step example08 40 "$carry/bin/08_cuda_moe" --small)
  note "08_cuda_moe --small: exit $rc in ${secs} s"
  tail -6 "$logs/example08.log" | sed 's/^/  /' >>"$summary"
  [ "$rc" -eq 0 ] || failed=1

  note "== compute-sanitizer"
  command -v compute-sanitizer >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
  local tool filter
  command -v compute-sanitizer >/dev/null || note "compute-sanitizer: not found on this machine"
  for tool in memcheck racecheck; do
    command -v compute-sanitizer >/dev/null || break
    if [ "$tool" = memcheck ]; then
      filter='cuda: quantize equals*,cuda gemm: M = 0*,cuda gemm_grouped*,cuda moe: dispatch*,cuda router: token-choice routers on exact*'
    else
      filter='cuda gemm_grouped*,cuda moe: dispatch*'
    fi
    read -r rc secs < <(step "sanitizer-$tool" 70 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 "$carry/bin/moqe_cuda_tests" "$filter")
    if grep -qiE "Device not supported|unsupported|error 999|Failed to initialize" \
      "$logs/sanitizer-$tool.log"; then
      note "$tool: unsupported on this machine (the sanitizer cannot attach): $(grep -iE 'not supported|unsupported|999' "$logs/sanitizer-$tool.log" | head -1)"
    else
      note "$tool: exit $rc in ${secs} s; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/sanitizer-$tool.log" | tail -1)"
      [ "$rc" -eq 0 ] || failed=1
    fi
  done

  note "== benchmarks (short)"
  local filter_b='BM_CudaMemcpy|BM_CudaGemm/(f16_cublas|w4_g128|w8_channel)/(14336x4096|1408x2048)/batch:(1|16|256)/|BM_CudaMoeLayer/(mixtral|e64k6)/(w4_g128|f16_cublas_loop)/tokens:(1|16)/'
  read -r rc secs < <(step bench 110 "$carry/bin/moqe_bench_cuda" --benchmark_filter="$filter_b" \
    --benchmark_min_time=0.05s --benchmark_out="$logs/bench.json" --benchmark_out_format=json)
  note "moqe_bench_cuda: exit $rc in ${secs} s"
  if [ -s "$logs/bench.json" ]; then
    python3 - "$logs/bench.json" <<'EOF' | tee -a "$summary"
import json, sys
runs = json.load(open(sys.argv[1]))["benchmarks"]
t = {r["name"].replace("/manual_time", ""): r for r in runs}
copy = next((r.get("bytes_per_second", 0) for n, r in t.items() if n.startswith("BM_CudaMemcpy")), 0)
print(f"memcpy ceiling: {copy / 1e9:.0f} GB/s (bytes read + written)")
print(f"{'benchmark':58s} {'us':>9s} {'GB/s':>7s} {'x cuBLAS':>9s} {'of copy':>8s}")
for n, r in t.items():
    us = r.get("gpu_us", r["real_time"])
    bw = r.get("bytes_per_second", 0)
    parts = n.split("/")
    base = None
    if n.startswith("BM_CudaGemm") and parts[1] != "f16_cublas":
        base = t.get("/".join([parts[0], "f16_cublas"] + parts[2:]))
    if n.startswith("BM_CudaMoeLayer") and parts[2] != "f16_cublas_loop":
        base = t.get("/".join(parts[:2] + ["f16_cublas_loop"] + parts[3:]))
    speed = f"{base.get('gpu_us', base['real_time']) / us:.2f}" if base else ""
    frac = f"{bw / copy:.0%}" if copy and bw else ""
    print(f"{n:58s} {us:9.1f} {bw / 1e9:7.0f} {speed:>9s} {frac:>8s}")
EOF
  fi

  note "== $(( $(date +%s) - t_start )) s in all; tests $([ $failed -eq 0 ] && echo passed || echo FAILED)"
  cp "$carry/ptxas.txt" "$logs/" 2>/dev/null
  cp "$summary" "$out/summary.txt"
  [ -s "$logs/bench.json" ] && cp "$logs/bench.json" "$out/bench.json"
  tar -czf "$out/results.tar.gz" -C "$logs" .
  cat "$out/summary.txt"
  return $failed
}

case "${1:-}" in
  prepare) prepare ;;
  rehearse) rehearse ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu-first.sh prepare | rehearse | run"; exit 2 ;;
esac
