// BM_MemRead: the machine's read-bandwidth ceiling, all threads summing a buffer far larger than
// the last-level cache.
#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <vector>

#include "bench_util.hpp"

namespace {

// Sums n 64-bit words with four independent 256-bit accumulators (AVX2 where the CPU has it), so
// the loop is bound by the memory system, not by adds.
__attribute__((target("avx2"))) uint64_t sum_avx2(const uint64_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 16 <= n; i += 16) {
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return t[0] + t[1] + t[2] + t[3];
}

uint64_t sum_scalar(const uint64_t* p, size_t n) {
  uint64_t s[4] = {0, 0, 0, 0};
  for (size_t i = 0; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) s[j] += p[i + j];
  }
  return s[0] + s[1] + s[2] + s[3];
}

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
    const bool avx2 = __builtin_cpu_supports("avx2");
#pragma omp parallel num_threads(threads) reduction(+ : s0)
    {
      const size_t t = static_cast<size_t>(omp_get_thread_num()),
                   nt = static_cast<size_t>(omp_get_num_threads());
      const size_t b = buf.size() * t / nt / 16 * 16, e = buf.size() * (t + 1) / nt / 16 * 16;
      s0 += avx2 ? sum_avx2(buf.data() + b, e - b) : sum_scalar(buf.data() + b, e - b);
    }
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
