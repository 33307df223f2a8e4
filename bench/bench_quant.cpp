// Quantization and dequantization throughput of the scalar reference (what `moqe quantize` costs
// per matrix), on a Mixtral expert shape.
#include <benchmark/benchmark.h>

#include <moqe/moqe.hpp>

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
