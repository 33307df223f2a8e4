// BM_CudaMoeLayer/<shape>/<weights>/tokens:<T>: one MoE layer step on the GPU.
//   <shape>: mixtral (H 4096, I 14336, 8 experts, top-2) or e64k6 (H 2048, I 1408, 64 experts,
//     top-6, DeepSeek-V2-Lite / Qwen-MoE class).
//   <weights>: moqe's cuda::MoELayer with w4_g128 or w8_channel experts (router, dispatch, grouped
//     gate+up, GLU, grouped down, combine), or f16_cublas_loop: the same routing's expert GEMMs as
//     one cuBLAS fp16 call per projection per used expert (GEMMs only: no routing, gather,
//     activation or combine, so a lower bound on a per-expert cuBLAS layer).
// Counters: bytes_per_second of the expert weight bytes the step reads (the experts that receive
// tokens), gpu_us per step (CUDA events), experts_used. The layer's weights (0.5 to 3 GB) are far
// larger than L2, and consecutive steps read different experts' weights less often than not, so
// the weights are cold without extra copies.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cuda_bench_util.hpp"
#include "moqe/cuda/moe.hpp"
#include "moqe/cuda/quantize.hpp"

void register_moe_benchmarks();

namespace {

using moqe::cuda::DeviceBuffer;

using moqe_bench::check;

struct Shape {
  const char* name;
  int64_t hidden, inter, experts, top_k;
};

std::vector<float> random_matrix(int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (auto& v : w) v = g(rng);
  return w;
}

moqe::Router make_router(const Shape& s) {
  moqe::RouterConfig rc;
  rc.kind = s.experts == 8 ? moqe::RouterKind::kMixtral : moqe::RouterKind::kSoftmaxTopK;
  rc.num_experts = s.experts;
  rc.top_k = s.top_k;
  return moqe::Router(rc, random_matrix(s.experts, s.hidden, 3), s.hidden);
}

// One layer per (shape, weights), built on first use: every expert holds its own device copy of
// one quantized gate/up and down matrix (quantized on the GPU).
const moqe::cuda::MoELayer& layer(const Shape& s, const std::string& weights) {
  static std::map<std::string, std::unique_ptr<moqe::cuda::MoELayer>> cache;
  auto& l = cache[std::string(s.name) + "/" + weights];
  if (!l) {
    const moqe::QuantScheme scheme =
        weights == "w4_g128" ? moqe::QuantScheme{4, moqe::QuantMode::kSym, 128}
                             : moqe::QuantScheme{8, moqe::QuantMode::kSym, moqe::kPerChannel};
    const auto wu = random_matrix(s.inter, s.hidden, 11), wd = random_matrix(s.hidden, s.inter, 12);
    const moqe::QuantizedMatrix up = moqe::cuda::quantize(
        moqe::MatrixView<const float>(wu.data(), s.inter, s.hidden), scheme, "up");
    const moqe::QuantizedMatrix down = moqe::cuda::quantize(
        moqe::MatrixView<const float>(wd.data(), s.hidden, s.inter), scheme, "down");
    const std::vector<moqe::QuantizedMatrix> ups(static_cast<size_t>(s.experts), up),
        downs(static_cast<size_t>(s.experts), down);
    l = std::make_unique<moqe::cuda::MoELayer>(
        make_router(s), moqe::cuda::make_device_experts(ups, ups, downs, moqe::Activation::kSilu));
  }
  return *l;
}

// Rows per expert of one step's routing, from the CPU router on the same tokens.
std::vector<int64_t> rows_per_expert(const Shape& s, const std::vector<float>& x, int64_t t) {
  moqe::Routing r;
  make_router(s).route(moqe::MatrixView<const float>(x.data(), t, s.hidden), r);
  return r.expert_load;
}

template <class F>
void run_steps(benchmark::State& state, cudaStream_t stream, double bytes, int64_t used, F&& step) {
  moqe_bench::time_calls(stream, 3, [&](int) { step(); });  // warm-up
  double total = 0;
  for (auto _ : state) {
    const double sec = moqe_bench::time_calls(stream, 10, [&](int) { step(); });
    state.SetIterationTime(sec);
    total += sec;
  }
  check(cudaGetLastError(), "launch");
  const double it = static_cast<double>(state.iterations());
  if (total > 0) {
    state.counters["bytes_per_second"] = bytes * it / total;
    state.counters["gpu_us"] = 1e6 * total / it;
  }
  state.counters["experts_used"] = static_cast<double>(used);
}

void bm_layer(benchmark::State& state, Shape s, std::string weights, int64_t t) {
  const moqe::cuda::MoELayer& l = layer(s, weights);
  const auto x = random_matrix(t, s.hidden, 21);
  const auto rows = rows_per_expert(s, x, t);
  DeviceBuffer dx(x.size() * 4), dy(x.size() * 4);
  dx.upload(std::span<const float>(x));
  auto ws = l.make_workspace(t);
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "stream");
  const int64_t per_expert = 3 * s.hidden * s.inter;  // weights of one expert
  const double bytes_per_weight = static_cast<double>(l.device_bytes() - s.experts * s.hidden * 4) /
                                  static_cast<double>(per_expert * s.experts);
  int64_t used = 0;
  for (int64_t n : rows) used += n > 0 ? 1 : 0;
  run_steps(state, stream, bytes_per_weight * static_cast<double>(per_expert * used), used,
            [&] { l.run(dx.as<float>(), dy.as<float>(), t, ws, stream); });
  cudaStreamDestroy(stream);
}

// The per-expert cuBLAS baseline: fp16 weights [2I, H] (gate and up) and [H, I] per expert.
struct F16Experts {
  std::vector<DeviceBuffer> first, down;
};
const F16Experts& f16_experts(const Shape& s) {
  static std::map<std::string, F16Experts> cache;
  F16Experts& f = cache[s.name];
  if (f.first.empty()) {
    const auto wu = random_matrix(2 * s.inter, s.hidden, 11),
               wd = random_matrix(s.hidden, s.inter, 12);
    std::vector<uint16_t> hu(wu.size()), hd(wd.size());
    for (size_t i = 0; i < wu.size(); ++i) hu[i] = moqe::float_to_half_bits(wu[i]);
    for (size_t i = 0; i < wd.size(); ++i) hd[i] = moqe::float_to_half_bits(wd[i]);
    for (int64_t e = 0; e < s.experts; ++e) {
      f.first.emplace_back(hu.size() * 2);
      f.first.back().upload(hu.data(), hu.size() * 2);
      f.down.emplace_back(hd.size() * 2);
      f.down.back().upload(hd.data(), hd.size() * 2);
    }
  }
  return f;
}

void bm_cublas_loop(benchmark::State& state, Shape s, int64_t t) {
  const F16Experts& f = f16_experts(s);
  const auto x = random_matrix(t, s.hidden, 21);
  const auto rows = rows_per_expert(s, x, t);
  const int64_t total_rows = t * s.top_k;
  DeviceBuffer xe(static_cast<size_t>(total_rows * s.hidden * 2)),
      h(static_cast<size_t>(total_rows * 2 * s.inter * 2)),
      a(static_cast<size_t>(total_rows * s.inter * 2)),
      ye(static_cast<size_t>(total_rows * s.hidden * 2));
  check(cudaMemset(xe.data(), 0x3c, xe.size()), "memset");  // 1.0-ish halves
  check(cudaMemset(a.data(), 0x3c, a.size()), "memset");
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "stream");
  cublasHandle_t handle;
  check(cublasCreate(&handle), "cublasCreate");
  check(cublasSetStream(handle, stream), "cublasSetStream");
  const float alpha = 1.0f, beta = 0.0f;
  int64_t used = 0;
  for (int64_t n : rows) used += n > 0 ? 1 : 0;
  const auto gemm = [&](const void* w, const void* in, void* out, int64_t n, int64_t k,
                        int64_t m) {  // out^T [n, m] = W [n, k] . in^T, column-major views
    check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha, w, CUDA_R_16F, static_cast<int>(k), in,
                       CUDA_R_16F, static_cast<int>(k), &beta, out, CUDA_R_16F, static_cast<int>(n),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  };
  run_steps(state, stream, 2.0 * static_cast<double>(3 * s.hidden * s.inter * used), used, [&] {
    int64_t off = 0;
    for (int64_t e = 0; e < s.experts; ++e) {
      const int64_t m = rows[static_cast<size_t>(e)];
      if (m == 0) continue;
      auto* xp = static_cast<const uint16_t*>(xe.data()) + off * s.hidden;
      auto* hp = static_cast<uint16_t*>(h.data()) + off * 2 * s.inter;
      auto* ap = static_cast<const uint16_t*>(a.data()) + off * s.inter;
      auto* yp = static_cast<uint16_t*>(ye.data()) + off * s.hidden;
      gemm(f.first[static_cast<size_t>(e)].data(), xp, hp, 2 * s.inter, s.hidden, m);
      gemm(f.down[static_cast<size_t>(e)].data(), ap, yp, s.hidden, s.inter, m);
      off += m;
    }
  });
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
}

}  // namespace

// Called by bench_gemm.cpp's main once a device is known to be present.
void register_moe_benchmarks() {
  const Shape shapes[] = {{"mixtral", 4096, 14336, 8, 2}, {"e64k6", 2048, 1408, 64, 6}};
  const int64_t tokens[] = {1, 2, 4, 8, 16, 64, 256};
  for (const Shape& s : shapes) {
    auto name = [&](const char* weights, int64_t t) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "BM_CudaMoeLayer/%s/%s/tokens:%lld", s.name, weights,
                    static_cast<long long>(t));
      return std::string(buf);
    };
    for (int64_t t : tokens) {
      benchmark::RegisterBenchmark(name("f16_cublas_loop", t).c_str(),
                                   [=](benchmark::State& st) { bm_cublas_loop(st, s, t); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
    for (const char* w : {"w4_g128", "w8_channel"}) {
      for (int64_t t : tokens) {
        const std::string weights = w;
        benchmark::RegisterBenchmark(name(w, t).c_str(),
                                     [=](benchmark::State& st) { bm_layer(st, s, weights, t); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
}
