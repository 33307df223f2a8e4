// Quantization and dequantization throughput of the scalar reference (what `moqe quantize` costs
// per matrix), on a Mixtral expert shape.
#include <benchmark/benchmark.h>

#include <map>
#include <moqe/moqe.hpp>
#include <random>
#include <string>

namespace {

constexpr int64_t kN = 14336, kK = 4096;

const std::vector<float>& weights() {
  static const std::vector<float> w = moqe::synthetic_weights(kN, kK, 1);
  return w;
}

void BM_Quantize(benchmark::State& state) {
  const moqe::QuantScheme s{static_cast<int>(state.range(0)), moqe::QuantMode::kSym, 128};
  const moqe::MatrixView<const float> v(weights().data(), kN, kK);
  for (auto _ : state) benchmark::DoNotOptimize(moqe::quantize(v, s));
  state.SetItemsProcessed(state.iterations() * kN * kK);
  state.SetBytesProcessed(state.iterations() * kN * kK * 4);
}
BENCHMARK(BM_Quantize)->Arg(4)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_Dequantize(benchmark::State& state) {
  const moqe::QuantScheme s{static_cast<int>(state.range(0)), moqe::QuantMode::kSym, 128};
  const moqe::QuantizedMatrix q =
      moqe::quantize(moqe::MatrixView<const float>(weights().data(), kN, kK), s);
  std::vector<float> out(static_cast<size_t>(kN * kK));
  for (auto _ : state) {
    moqe::dequantize(q, moqe::MatrixView<float>(out.data(), kN, kK));
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * kN * kK);
  state.SetBytesProcessed(state.iterations() * q.storage_bytes());
}
BENCHMARK(BM_Dequantize)->Arg(4)->Arg(3)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

namespace {

// BM_QuantizeMethod/<method>/<mode>/w<bits>_g<G>/<weights>: quantization time of one Mixtral
// expert matrix (14336 x 4096) by each method, with its weight error (rel_err: relative Frobenius
// norm of W - W') as a counter. Weights: "mixtral" (moqe::synthetic_weights: Gaussian with 0.5%
// outlier input channels x4), "gauss" and "student_t3" (heavy-tailed, 3 degrees of freedom).
const std::vector<float>& method_weights(const std::string& kind) {
  static std::map<std::string, std::vector<float>> cache;
  auto& w = cache[kind];
  if (w.empty()) {
    if (kind == "mixtral") {
      w = moqe::synthetic_weights(kN, kK, 1);
    } else {
      std::mt19937 rng(kind == "gauss" ? 2 : 3);
      std::normal_distribution<float> g(0.0f, 0.02f);
      std::student_t_distribution<float> st(3.0f);
      w.resize(static_cast<size_t>(kN * kK));
      for (auto& v : w) v = kind == "gauss" ? g(rng) : 0.01f * st(rng);
    }
  }
  return w;
}

void BM_QuantizeMethod(benchmark::State& state, moqe::QuantMethod method, moqe::QuantScheme s,
                       std::string kind) {
  const moqe::MatrixView<const float> v(method_weights(kind).data(), kN, kK);
  moqe::QuantizeOptions o;
  o.method = method;
  moqe::QuantizedMatrix q;
  for (auto _ : state) {
    q = moqe::quantize(v, s, o);
    benchmark::DoNotOptimize(q);
  }
  state.counters["rel_err"] = moqe::quantization_error(v, q).rel_frobenius;
  state.SetItemsProcessed(state.iterations() * kN * kK);
}

const bool method_benchmarks = [] {
  for (const char* kind : {"mixtral", "gauss", "student_t3"}) {
    for (const int bits : {2, 3, 4}) {
      for (const int64_t g : {int64_t{64}, int64_t{128}}) {
        for (const moqe::QuantMode mode : {moqe::QuantMode::kAsym, moqe::QuantMode::kSymFull}) {
          for (const moqe::QuantMethod m :
               {moqe::QuantMethod::kRtn, moqe::QuantMethod::kSearch, moqe::QuantMethod::kHqq}) {
            if (m == moqe::QuantMethod::kHqq && mode != moqe::QuantMode::kAsym) continue;
            const std::string name = "BM_QuantizeMethod/" + std::string(moqe::to_string(m)) + "/" +
                                     std::string(moqe::to_string(mode)) + "/w" +
                                     std::to_string(bits) + "_g" + std::to_string(g) + "/" + kind;
            benchmark::RegisterBenchmark(name.c_str(), BM_QuantizeMethod, m,
                                         moqe::QuantScheme{bits, mode, g}, std::string(kind))
                ->Iterations(1)
                ->UseRealTime()
                ->Unit(benchmark::kMillisecond);
          }
        }
      }
    }
  }
  return true;
}();

}  // namespace
