// moqe_bench_cuda: GPU GEMM benchmarks (Google Benchmark, times from CUDA events).
//   BM_CudaGemm/<weights>/<N>x<K>/batch:<M>: y [M, N] = x [M, K] . W^T, fp16 activations and
//     outputs. <weights>: f16_cublas (cuBLAS fp16 GEMM, fp32 accumulation) or moqe's w4_g128,
//     w4_channel, w8_channel (int sym, cuda::gemm). Shapes: Mixtral (14336x4096, 4096x14336) and
//     DeepSeek-V2-Lite / Qwen-MoE experts (1408x2048, 2048x1408).
//   BM_CudaMemcpy: device-to-device copy of 256 MiB, the bandwidth ceiling.
//   BM_CudaMoeLayer/...: the whole MoE layer against a per-expert cuBLAS loop (bench_moe.cpp).
// Weights are cold: each call reads the next of enough copies to pass twice the L2 cache (at least
// 100 MB). Each timing sample is one pass over the copies between two events; the manual time is
// the sample's time per call (Google Benchmark appends "/manual_time" to the names).
// bytes_per_second counts weight bytes (codes + scales + zero points, or fp16 weights) per call;
// for BM_CudaMemcpy it counts bytes read plus bytes written. Without a device the binary says so
// and exits 0.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_bench_util.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/cuda/gemm.hpp"
#include "moqe/cuda/runtime.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace {

using moqe::cuda::DeviceBuffer;

using moqe_bench::check;
using moqe_bench::time_calls;

// Bytes of rotating weight copies: twice the L2 cache, at least 100 MB.
int64_t cold_bytes() {
  int l2 = 0;
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0), "L2 size");
  return std::max<int64_t>(int64_t{100} << 20, 2 * static_cast<int64_t>(l2));
}
int copies_for(int64_t bytes) {
  return static_cast<int>(std::max<int64_t>(2, (cold_bytes() + bytes - 1) / bytes + 1));
}

// Random fp32 weights [n, k] (normal, std 0.02), generated once per shape.
const std::vector<float>& weights(int64_t n, int64_t k) {
  static std::map<std::pair<int64_t, int64_t>, std::vector<float>> cache;
  auto& w = cache[{n, k}];
  if (w.empty()) {
    std::mt19937 rng(static_cast<uint32_t>(n * 131 + k));
    std::normal_distribution<float> g(0.0f, 0.02f);
    w.resize(static_cast<size_t>(n * k));
    for (auto& v : w) v = g(rng);
  }
  return w;
}

const moqe::QuantizedMatrix& quantized(int64_t n, int64_t k, const moqe::QuantScheme& s) {
  static std::map<std::tuple<int64_t, int64_t, int, int, int64_t>, moqe::QuantizedMatrix> cache;
  auto& q = cache[{n, k, s.bits, static_cast<int>(s.mode), s.group_size}];
  if (q.rows() == 0) {
    q = moqe::quantize(moqe::MatrixView<const float>(weights(n, k).data(), n, k), s);
  }
  return q;
}

std::vector<uint16_t> random_half(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<uint16_t> v(static_cast<size_t>(count));
  for (auto& h : v) h = moqe::float_to_half_bits(g(rng));
  return v;
}

// Runs the benchmark loop: each iteration one pass over `copies` calls.
template <class F>
void run(benchmark::State& state, cudaStream_t stream, int copies, double bytes_per_call,
         F&& call) {
  time_calls(stream, copies, call);  // warm-up: first-launch costs, cuBLAS heuristics
  check(cudaGetLastError(), "launch");
  double total = 0;
  for (auto _ : state) {
    const double s = time_calls(stream, copies, call);
    state.SetIterationTime(s);
    total += s;
  }
  check(cudaGetLastError(), "launch");
  const double it = static_cast<double>(state.iterations());
  if (total > 0) {
    state.counters["bytes_per_second"] = bytes_per_call * it / total;
    state.counters["gpu_us"] = 1e6 * total / it;
  }
  state.counters["copies"] = copies;
}

// The weight copies of the benchmark that ran last: the registration order (shape, weights, batch)
// makes consecutive benchmarks share them, so each set is built and uploaded once.
struct WeightCopies {
  std::string key;
  std::vector<DeviceBuffer> f16;                         // f16_cublas
  std::vector<moqe::cuda::DeviceQuantizedMatrix> quant;  // moqe
  int64_t bytes = 0;                                     // per copy
};
WeightCopies& copies_cache() {
  static WeightCopies c;
  return c;
}

const WeightCopies& f16_copies(int64_t n, int64_t k) {
  WeightCopies& c = copies_cache();
  const std::string key = "f16/" + std::to_string(n) + "x" + std::to_string(k);
  if (c.key == key) return c;
  c = WeightCopies{};
  c.bytes = n * k * 2;
  std::vector<uint16_t> w16(static_cast<size_t>(n * k));
  const auto& w = weights(n, k);
  for (size_t i = 0; i < w16.size(); ++i) w16[i] = moqe::float_to_half_bits(w[i]);
  const int copies = copies_for(c.bytes);
  for (int i = 0; i < copies; ++i) {
    c.f16.emplace_back(static_cast<size_t>(c.bytes));
    c.f16.back().upload(w16.data(), static_cast<size_t>(c.bytes));
  }
  c.key = key;
  return c;
}

const WeightCopies& quant_copies(int64_t n, int64_t k, const moqe::QuantScheme& scheme) {
  WeightCopies& c = copies_cache();
  const std::string key = scheme.to_string() + "/" + std::to_string(n) + "x" + std::to_string(k);
  if (c.key == key) return c;
  c = WeightCopies{};
  const moqe::QuantizedMatrix& q = quantized(n, k, scheme);
  c.quant.emplace_back(q);
  c.bytes = c.quant[0].device_bytes();
  const int copies = copies_for(c.bytes);
  while (static_cast<int>(c.quant.size()) < copies) c.quant.emplace_back(q);
  c.key = key;
  return c;
}

void bm_cublas(benchmark::State& state, int64_t n, int64_t k, int64_t m) {
  const WeightCopies& wc = f16_copies(n, k);
  const int copies = static_cast<int>(wc.f16.size());
  const auto xh = random_half(m * k, 7);
  DeviceBuffer xd(xh.size() * 2), yd(static_cast<size_t>(m * n * 2));
  xd.upload(xh.data(), xh.size() * 2);
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "stream");
  cublasHandle_t handle;
  check(cublasCreate(&handle), "cublasCreate");
  check(cublasSetStream(handle, stream), "cublasSetStream");
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major view: y^T [N, M] = W [N, K] (row-major, so op T of a K x N matrix) . x^T [K, M].
  run(state, stream, copies, static_cast<double>(wc.bytes), [&](int i) {
    check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha, wc.f16[static_cast<size_t>(i)].data(),
                       CUDA_R_16F, static_cast<int>(k), xd.data(), CUDA_R_16F, static_cast<int>(k),
                       &beta, yd.data(), CUDA_R_16F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  });
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
}

void bm_moqe(benchmark::State& state, int64_t n, int64_t k, int64_t m, moqe::QuantScheme scheme) {
  const WeightCopies& wc = quant_copies(n, k, scheme);
  const int copies = static_cast<int>(wc.quant.size());
  const auto xh = random_half(m * k, 7);
  DeviceBuffer xd(xh.size() * 2), yd(static_cast<size_t>(m * n * 2));
  xd.upload(xh.data(), xh.size() * 2);
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "stream");
  const moqe::MatrixView<const moqe::Half> x(xd.as<const moqe::Half>(), m, k);
  const moqe::MatrixView<moqe::Half> y(yd.as<moqe::Half>(), m, n);
  run(state, stream, copies, static_cast<double>(wc.bytes),
      [&](int i) { moqe::cuda::gemm(x, wc.quant[static_cast<size_t>(i)], y, stream); });
  cudaStreamDestroy(stream);
}

void bm_memcpy(benchmark::State& state) {
  const size_t bytes = size_t{256} << 20;
  DeviceBuffer a(bytes), b(bytes);
  check(cudaMemset(a.data(), 1, bytes), "memset");
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "stream");
  run(state, stream, 4, 2.0 * static_cast<double>(bytes), [&](int i) {
    void* dst = (i % 2 == 0) ? b.data() : a.data();
    const void* src = (i % 2 == 0) ? a.data() : b.data();
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream), "memcpy");
  });
  cudaStreamDestroy(stream);
}

void register_all() {
  const std::pair<int64_t, int64_t> shapes[] = {
      {14336, 4096}, {4096, 14336}, {1408, 2048}, {2048, 1408}};
  const int64_t batches[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};
  struct Scheme {
    const char* name;
    moqe::QuantScheme scheme;
  };
  const Scheme schemes[] = {{"w4_g128", {4, moqe::QuantMode::kSym, 128}},
                            {"w4_channel", {4, moqe::QuantMode::kSym, moqe::kPerChannel}},
                            {"w8_channel", {8, moqe::QuantMode::kSym, moqe::kPerChannel}}};
  for (const auto& [n, k] : shapes) {
    auto name = [&](const char* weights, int64_t m) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "BM_CudaGemm/%s/%lldx%lld/batch:%lld", weights,
                    static_cast<long long>(n), static_cast<long long>(k),
                    static_cast<long long>(m));
      return std::string(buf);
    };
    for (int64_t m : batches) {
      benchmark::RegisterBenchmark(name("f16_cublas", m).c_str(),
                                   [=](benchmark::State& s) { bm_cublas(s, n, k, m); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
    for (const Scheme& s : schemes) {
      const moqe::QuantScheme scheme = s.scheme;
      for (int64_t m : batches) {
        benchmark::RegisterBenchmark(name(s.name, m).c_str(),
                                     [=](benchmark::State& st) { bm_moqe(st, n, k, m, scheme); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
  benchmark::RegisterBenchmark("BM_CudaMemcpy", bm_memcpy)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

void register_moe_benchmarks();  // bench_moe.cpp

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (moqe::cuda::device_count() == 0) {
    const char* required = std::getenv("MOQE_REQUIRE_GPU");
    const bool fail = required != nullptr && std::string(required) == "1";
    std::printf("moqe_bench_cuda: no CUDA device (%s); nothing to measure (exit %d)\n",
                moqe::cuda::device_error().c_str(), fail ? 1 : 0);
    return fail ? 1 : 0;
  }
  std::printf("moqe_bench_cuda on %s\n", moqe::cuda::device_name(0).c_str());
  register_all();
  register_moe_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  copies_cache() = WeightCopies{};  // free the device copies while the runtime is up
  benchmark::Shutdown();
  return 0;
}
