// BM_Gemv/<weights>/<N>x<K>/batch:<M>: y [M, N] = x [M, K] . W^T on cold weights (the benchmark
// rotates among enough copies of W to exceed 512 MiB, far beyond the last-level cache, as in
// decoding where each layer's weights are read once per token). bytes_per_second counts weight
// bytes; items_per_second counts tokens (rows of x).
// BM_GemvIsa/<weights>/<N>x<K>/isa:<level>/batch:<M> (M = 1, 4): the decode kernels of each level
// this CPU has (AVX2, and AVX-512 / AVX-512 VNNI where present) side by side in one run, forced
// with an explicit cap: the measurements behind the default choice (docs/kernels.md).
// BM_GemvLoaded/<scheme>/<N>x<K>/batch:<M>: the int4 schemes GPTQ, AWQ and compressed-tensors
// checkpoints load as, beside moqe's own w4_g128 (loaded_kinds()).
// BM_GemvHot/<weights>/2048x4096/batch:<M> (M = 1, 4, 8, 16): the same on one thread with one
// copy of W that stays in the caches (4-16 MB): the kernels' instruction throughput, free of the
// memory system's noise (the figure to compare when changing a kernel's inner loop);
// items_per_second counts weights x rows.
#include <benchmark/benchmark.h>
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <map>
#include <memory>
#include <moqe/moqe.hpp>
#include <optional>
#include <random>
#include <string>

#include "bench_util.hpp"

namespace {

constexpr int kThreads = 2;
constexpr int64_t kColdBytes = int64_t{512} << 20;

struct Weights {
  std::string name;
  moqe::QuantScheme scheme;  // bits == 0: unquantized
  moqe::DType dense = moqe::DType::kF32;
  bool eigen = false;
  bool fast = false;                               // fast mode: int8 activations
  std::optional<moqe::CpuIsa> isa = std::nullopt;  // an explicit cap while building the layer
  bool act_order = false;  // columns stored in a random order, as act-order GPTQ loads
};

// The schemes other tools' int4 checkpoints load as (docs/formats.md): GPTQ and compressed-tensors
// sym as sym_full, AWQ and asym GPTQ as asym, act-order GPTQ as sym_full with an input order;
// moqe's own sym first, for the ratio. Registered side by side as BM_GemvLoaded.
const std::vector<Weights>& loaded_kinds() {
  static const std::vector<Weights> w = {
      {"w4_g128", {4, moqe::QuantMode::kSym, 128}},
      {"w4_g128_sym_full", {4, moqe::QuantMode::kSymFull, 128}},
      {"w4_g128_asym", {4, moqe::QuantMode::kAsym, 128}},
      {"w4_g128_act_order",
       {4, moqe::QuantMode::kSymFull, 128},
       moqe::DType::kF32,
       false,
       false,
       std::nullopt,
       true},
  };
  return w;
}

const std::vector<Weights>& weight_kinds() {
  static const std::vector<Weights> w = {
      {"f32_eigen", {0}, moqe::DType::kF32, true},
      {"f16", {0}, moqe::DType::kF16},
      {"w8_channel", {8, moqe::QuantMode::kSym, moqe::kPerChannel}},
      {"w4_channel", {4, moqe::QuantMode::kSym, moqe::kPerChannel}},
      {"w4_g128", {4, moqe::QuantMode::kSym, 128}},
      {"w4_g32", {4, moqe::QuantMode::kSym, 32}},
      {"w3_g64", {3, moqe::QuantMode::kSym, 64}},
      {"w2_g128", {2, moqe::QuantMode::kSym, 128}},
      {"w4_g128_fast", {4, moqe::QuantMode::kSym, 128}, moqe::DType::kF32, false, true},
      {"w8_g32_fast", {8, moqe::QuantMode::kSym, 32}, moqe::DType::kF32, false, true},
  };
  return w;
}

// Copies of one weight matrix, built once per (weights, shape) and reused for every batch size.
struct Copies {
  std::vector<moqe::QuantizedLinear> layers;
  std::vector<std::vector<float>> eigen;  // f32_eigen: plain row-major copies
  int64_t bytes = 0;                      // of one copy
  double fast_error = 0;                  // fast mode: ||y_fast - y_exact|| / ||y_exact||
};

// One layer of `kind` for w [n, k] (not for f32_eigen); fast_error: see Copies.
moqe::QuantizedLinear make_layer(const Weights& kind, const std::vector<float>& w, int64_t n,
                                 int64_t k, double* fast_error) {
  if (kind.scheme.bits == 0) {
    std::vector<uint16_t> h(w.size());
    for (size_t i = 0; i < w.size(); ++i) h[i] = moqe::float_to_half_bits(w[i]);
    return moqe::QuantizedLinear::from_half(std::move(h), moqe::DType::kF16, n, k);
  }
  moqe::QuantizedMatrix q =
      moqe::quantize(moqe::MatrixView<const float>(w.data(), n, k), kind.scheme);
  if (kind.act_order) {
    std::vector<int32_t> order(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) order[static_cast<size_t>(c)] = static_cast<int32_t>(c);
    std::shuffle(order.begin(), order.end(), std::mt19937(5));
    q.set_input_order(std::move(order));
  }
  moqe::QuantizedLinear base = moqe::QuantizedLinear::from_quantized(
      q, kind.fast ? moqe::Numerics::kFast : moqe::Numerics::kExact);
  if (kind.fast && fast_error != nullptr) {  // the price of fast mode, on random activations
    const auto exact = moqe::QuantizedLinear::from_quantized(q);
    std::vector<float> x(static_cast<size_t>(8 * k)), yf(static_cast<size_t>(8 * n)), ye(yf.size());
    std::mt19937 rng(7);
    std::normal_distribution<float> g(0.0f, 1.0f);
    for (auto& v : x) v = g(rng);
    base.forward(moqe::MatrixView<const float>(x.data(), 8, k),
                 moqe::MatrixView<float>(yf.data(), 8, n));
    exact.forward(moqe::MatrixView<const float>(x.data(), 8, k),
                  moqe::MatrixView<float>(ye.data(), 8, n));
    *fast_error = moqe::compare(moqe::MatrixView<const float>(ye.data(), 8, n),
                                moqe::MatrixView<const float>(yf.data(), 8, n))
                      .rel_frobenius;
  }
  return base;
}

Copies& copies(const Weights& kind, int64_t n, int64_t k) {
  static std::map<std::string, std::unique_ptr<Copies>> cache;
  const std::string key = kind.name + std::to_string(n) + "x" + std::to_string(k) +
                          (kind.isa ? std::string(moqe::to_string(*kind.isa)) : "");
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  cache.clear();  // one shape at a time keeps memory bounded
  auto c = std::make_unique<Copies>();
  const std::vector<float> w = moqe::synthetic_weights(n, k, 42);
  if (kind.eigen) {
    c->bytes = n * k * 4;
    const int64_t count = std::max<int64_t>(2, (kColdBytes + c->bytes - 1) / c->bytes);
    for (int64_t i = 0; i < count; ++i) c->eigen.push_back(w);
  } else {
    const std::optional<moqe::CpuIsa> previous = moqe::cpu_isa_cap();
    if (kind.isa) moqe::set_cpu_isa_cap(kind.isa);
    const moqe::QuantizedLinear base = make_layer(kind, w, n, k, &c->fast_error);
    moqe::set_cpu_isa_cap(previous);
    c->bytes = base.weight_bytes();
    const int64_t count = std::max<int64_t>(2, (kColdBytes + c->bytes - 1) / c->bytes);
    for (int64_t i = 0; i < count; ++i) c->layers.push_back(base.clone());
  }
  return *cache.emplace(key, std::move(c)).first->second;
}

void BM_Gemv(benchmark::State& state, const Weights& kind, int64_t n, int64_t k) {
  const int64_t m = state.range(0);
  Copies& c = copies(kind, n, k);
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(m * k)), y(static_cast<size_t>(m * n));
  for (auto& v : x) v = g(rng);
  size_t i = 0;
  moqe::bench::WallRate rate;
  for (auto _ : state) {
    rate.start();
    if (kind.eigen) {
      // Eigen fp32 baseline, rows split across the threads as moqe does.
      using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      const float* wd = c.eigen[i++ % c.eigen.size()].data();
      Eigen::Map<const Eigen::MatrixXf> xm(x.data(), k, m);  // column j = token j
#pragma omp parallel num_threads(kThreads)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t r0 = n * t / nt, r1 = n * (t + 1) / nt;
        Eigen::Map<const RowMajor> wm(wd + r0 * k, r1 - r0, k);
        Eigen::Map<Eigen::MatrixXf, 0, Eigen::OuterStride<>> ym(y.data() + r0, r1 - r0, m,
                                                                Eigen::OuterStride<>(n));
        ym.noalias() = wm * xm;
      }
    } else {
      c.layers[i++ % c.layers.size()].forward(moqe::MatrixView<const float>(x.data(), m, k),
                                              moqe::MatrixView<float>(y.data(), m, n), kThreads);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    rate.stop();
  }
  rate.report(state, static_cast<double>(c.bytes), static_cast<double>(m));
  state.counters["copies"] = static_cast<double>(kind.eigen ? c.eigen.size() : c.layers.size());
  if (kind.fast) state.counters["rel_err_vs_exact"] = c.fast_error;
  if (!kind.eigen) state.SetLabel(std::string(moqe::to_string(c.layers.front().isa())));
}

void BM_GemvHot(benchmark::State& state, const Weights& kind, int64_t n, int64_t k) {
  const int64_t m = state.range(0);
  const std::vector<float> w = moqe::synthetic_weights(n, k, 42);
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(m * k)), y(static_cast<size_t>(m * n));
  for (auto& v : x) v = g(rng);
  if (kind.eigen) {
    using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    Eigen::Map<const RowMajor> wm(w.data(), n, k);
    Eigen::Map<const Eigen::MatrixXf> xm(x.data(), k, m);
    Eigen::Map<Eigen::MatrixXf> ym(y.data(), n, m);
    for (auto _ : state) {
      ym.noalias() = wm * xm;
      benchmark::DoNotOptimize(y.data());
    }
  } else {
    const moqe::QuantizedLinear layer = make_layer(kind, w, n, k, nullptr);
    state.SetLabel(std::string(moqe::to_string(layer.isa())));  // the kernels' level
    for (auto _ : state) {
      layer.forward(moqe::MatrixView<const float>(x.data(), m, k),
                    moqe::MatrixView<float>(y.data(), m, n), 1);
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
  }
  state.SetItemsProcessed(state.iterations() * n * k * m);
}

const bool registered = [] {
  Eigen::setNbThreads(1);
  benchmark::AddCustomContext("moqe_best_cpu_isa",
                              std::string(moqe::to_string(moqe::best_cpu_isa())));
  const std::pair<int64_t, int64_t> shapes[] = {
      {14336, 4096}, {4096, 14336}, {1408, 2048}, {2048, 1408}};
  for (const auto& [n, k] : shapes) {
    for (const Weights& kind : weight_kinds()) {
      const std::string name =
          "BM_Gemv/" + kind.name + "/" + std::to_string(n) + "x" + std::to_string(k);
      benchmark::RegisterBenchmark(name.c_str(), BM_Gemv, kind, n, k)
          ->ArgName("batch")
          ->Arg(1)
          ->Arg(8)
          ->Arg(64)
          ->Unit(benchmark::kMillisecond);
    }
  }
  // The decode kernels of every level this CPU has, adjacent so that they run side by side.
  const std::pair<int64_t, int64_t> decode_shapes[] = {{14336, 4096}, {4096, 14336}};
  for (const auto& [n, k] : decode_shapes) {
    for (const Weights& base : weight_kinds()) {
      if (base.scheme.bits == 0) continue;
      std::vector<moqe::CpuIsa> levels = {moqe::CpuIsa::kAvx2};
      const moqe::CpuIsa wide = base.fast ? moqe::CpuIsa::kAvx512Vnni : moqe::CpuIsa::kAvx512;
      if (moqe::best_cpu_isa() >= wide) levels.push_back(wide);
      if (moqe::best_cpu_isa() < moqe::CpuIsa::kAvx2) continue;
      for (const moqe::CpuIsa level : levels) {
        Weights kind = base;
        kind.isa = level;
        const std::string name = "BM_GemvIsa/" + kind.name + "/" + std::to_string(n) + "x" +
                                 std::to_string(k) + "/isa:" + std::string(moqe::to_string(level));
        benchmark::RegisterBenchmark(name.c_str(), BM_Gemv, kind, n, k)
            ->ArgName("batch")
            ->Arg(1)
            ->Arg(4)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  for (const auto& [n, k] : decode_shapes) {
    for (const Weights& kind : loaded_kinds()) {
      const std::string name =
          "BM_GemvLoaded/" + kind.name + "/" + std::to_string(n) + "x" + std::to_string(k);
      benchmark::RegisterBenchmark(name.c_str(), BM_Gemv, kind, n, k)
          ->ArgName("batch")
          ->Arg(1)
          ->Arg(8)
          ->Unit(benchmark::kMillisecond);
    }
  }
  for (const Weights& kind : weight_kinds()) {
    const std::string name = "BM_GemvHot/" + kind.name + "/2048x4096";
    benchmark::RegisterBenchmark(name.c_str(), BM_GemvHot, kind, 2048, 4096)
        ->ArgName("batch")
        ->Arg(1)
        ->Arg(4)
        ->Arg(8)
        ->Arg(16)
        ->Unit(benchmark::kMicrosecond);
  }
  return true;
}();

}  // namespace
