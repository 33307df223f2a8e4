// BM_MemRead: the machine's read-bandwidth ceiling, all threads summing a buffer far larger than
// the last-level cache.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "bench_util.hpp"

namespace {

void mem_read(benchmark::State& state, int threads) {
  const size_t bytes = size_t{1} << 30;  // 1 GiB: far beyond any LLC of this machine class
  std::vector<uint64_t> buf(bytes / sizeof(uint64_t));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;  // first touch by the reading threads
  uint64_t sink = 0;
  moqe::bench::WallRate rate;
  for (auto _ : state) {
    rate.start();
    uint64_t s0 = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s0)
    for (size_t i = 0; i < buf.size(); i += 4) s0 += buf[i] + buf[i + 1] + buf[i + 2] + buf[i + 3];
    sink += s0;
    rate.stop();
  }
  benchmark::DoNotOptimize(sink);
  rate.report(state, static_cast<double>(bytes), static_cast<double>(bytes));
  state.counters["threads"] = threads;
}

// All threads (the ceiling for the multithreaded kernels), and one thread.
void BM_MemRead(benchmark::State& state) { mem_read(state, omp_get_max_threads()); }
void BM_MemReadOneThread(benchmark::State& state) { mem_read(state, 1); }
BENCHMARK(BM_MemRead)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MemReadOneThread)->Unit(benchmark::kMillisecond);

}  // namespace
