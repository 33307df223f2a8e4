#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 40) on its seed corpus (left untouched) and
# what earlier runs found; fails on a crash, sanitizer report, leak or hang (> 10 s on one input).
# Prints each target's executions. Usage: fuzz/run.sh [SECONDS] [BUILD_DIR] [TARGET...]
#   BUILD_DIR: a tree configured with -DCMAKE_CXX_COMPILER=clang++ -DMOQE_BUILD_FUZZERS=ON
#   (default build-asan, as .ci/run makes). New inputs go to BUILD_DIR/fuzz/work/<target>/corpus
#   (kept between runs), crashes to BUILD_DIR/fuzz/work/<target>/ (reproduce: fuzz_x FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-40}"
build="${2:-build-asan}"
shift $(( $# > 2 ? 2 : $# ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_safetensors fuzz_index fuzz_config fuzz_quantized fuzz_foreign)

status=0
for t in "${targets[@]}"; do
  bin="$build/fuzz/$t"
  if [ ! -x "$bin" ]; then
    echo "fuzz: $bin is not built (cmake --build $build --target moqe_fuzzers)"
    exit 2
  fi
  work="$build/fuzz/work/$t"
  mkdir -p "$work/corpus"
  # Scratch files on tmpfs where there is one, removed afterwards.
  tmp_base=/dev/shm
  [ -w "$tmp_base" ] || tmp_base="${TMPDIR:-/tmp}"
  scratch=$(mktemp -d "$tmp_base/moqe-fuzz.XXXXXX")
  # The first directory receives new inputs; the committed seeds stay read-only.
  MOQE_FUZZ_SCRATCH="$scratch" "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$work/" "$work/corpus" \
    "fuzz/corpus/$t" >"$work/log.txt" 2>&1 &
  pid=$!
  set +e
  wait $pid
  rc=$?
  set -e
  # libFuzzer ends with _Exit, so libomp leaves its registration file behind.
  rm -rf "$scratch" /dev/shm/__KMP_REGISTERED_LIB_"$pid"_*
  execs=$(sed -n "s/^stat::number_of_executed_units: *//p" "$work/log.txt" | tail -1 || true)
  cov=$(grep -o "cov: [0-9]*" "$work/log.txt" | tail -1 || true)
  printf 'fuzz: %-18s %6s s  %10s executions  %-10s  exit %d\n' "$t" "$seconds" "${execs:-?}" \
    "${cov:-}" "$rc"
  if [ "$rc" -ne 0 ]; then
    status=1
    echo "---- $t: last lines of $work/log.txt"
    tail -n 60 "$work/log.txt"
  fi
done
exit $status
