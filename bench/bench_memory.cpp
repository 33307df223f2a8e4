// BM_MemRead: the machine's read-bandwidth ceiling, all threads summing a buffer far larger than
// the last-level cache.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdint>
#include <vector>

namespace {

void BM_MemRead(benchmark::State& state) {
  const size_t bytes = size_t{1} << 30;  // 1 GiB: far beyond any LLC of this machine class
  const int threads = static_cast<int>(state.range(0));
  std::vector<uint64_t> buf(bytes / sizeof(uint64_t));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;  // first touch by the reading threads
  uint64_t sink = 0;
  for (auto _ : state) {
    uint64_t s0 = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s0)
    for (size_t i = 0; i < buf.size(); i += 4) s0 += buf[i] + buf[i + 1] + buf[i + 2] + buf[i + 3];
    sink += s0;
  }
  benchmark::DoNotOptimize(sink);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
  state.counters["threads"] = threads;
}
BENCHMARK(BM_MemRead)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
