// Rates for benchmarks whose work runs on several threads: Google Benchmark's own rates divide by
// the main thread's CPU time, and UseRealTime() would change the benchmark names (which outside
// scripts parse), so bytes_per_second and items_per_second are computed here from wall time.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>

namespace moqe::bench {

class WallRate {
 public:
  void start() { t0_ = std::chrono::steady_clock::now(); }
  void stop() {
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  // Sets bytes_per_second and items_per_second from the totals over all iterations.
  void report(benchmark::State& state, double bytes_per_iter, double items_per_iter) const {
    const double it = static_cast<double>(state.iterations());
    if (seconds_ <= 0 || it == 0) return;
    state.counters["bytes_per_second"] = benchmark::Counter(bytes_per_iter * it / seconds_);
    state.counters["items_per_second"] = benchmark::Counter(items_per_iter * it / seconds_);
    state.counters["wall_ms"] = benchmark::Counter(1e3 * seconds_ / it);
  }

 private:
  std::chrono::steady_clock::time_point t0_;
  double seconds_ = 0;
};

}  // namespace moqe::bench
