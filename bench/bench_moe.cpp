// BM_MoeLayer/<shape>/<weights>/tokens:<T>: one MoE layer (router, dispatch, experts, combine) on
// T tokens. Shapes: mixtral (H 4096, I 14336, 8 experts, top-2) and e64k6 (H 2048, I 1408, 64
// experts, top-6, as DeepSeek-V2-Lite / Qwen-MoE). The layer's expert weights exceed the last-level
// cache and the inputs rotate among 16 batches, so the experts read are cold. bytes_per_second
// counts the weight bytes of the experts the batch routes to (what the layer must read).
// Weights: f16, w8_channel, w4_g128, w3_g64, w2_g128 (exact numerics) and w4_g128_fast (fast mode:
// activations quantized to int8 per 32-block, see BM_Gemv).
// BM_RouterLogits: see below.
// BM_MoeLayerBf16/<shape>/w4_g128/tokens:<T>: the same layer on bf16 hidden states in and out
// (MoELayer::run<BFloat16>), beside BM_MoeLayer/<shape>/w4_g128: the cost of 16-bit activations.
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <moqe/moqe.hpp>
#include <random>
#include <string>

#include "bench_util.hpp"

namespace {

constexpr int kThreads = 2;

struct Shape {
  std::string name;
  int64_t h, i, e, k;
};

struct Layer {
  std::unique_ptr<moqe::MoELayer> layer;
  std::vector<int64_t> expert_bytes;
};

moqe::QuantizedLinear make_linear(const std::string& weights, int64_t n, int64_t k, uint32_t seed) {
  const std::vector<float> w = moqe::synthetic_weights(n, k, seed);
  if (weights == "f16") {
    std::vector<uint16_t> h(w.size());
    for (size_t i = 0; i < w.size(); ++i) h[i] = moqe::float_to_half_bits(w[i]);
    return moqe::QuantizedLinear::from_half(std::move(h), moqe::DType::kF16, n, k);
  }
  moqe::QuantScheme s{4, moqe::QuantMode::kSym, 128};
  if (weights == "w8_channel") s = {8, moqe::QuantMode::kSym, moqe::kPerChannel};
  if (weights == "w3_g64") s = {3, moqe::QuantMode::kSym, 64};
  if (weights == "w2_g128") s = {2, moqe::QuantMode::kSym, 128};
  const bool fast = weights == "w4_g128_fast";  // int8 activations (Numerics::kFast)
  return moqe::QuantizedLinear::from_quantized(
      moqe::quantize(moqe::MatrixView<const float>(w.data(), n, k), s),
      fast ? moqe::Numerics::kFast : moqe::Numerics::kExact);
}

Layer& get_layer(const Shape& shape, const std::string& weights) {
  static std::map<std::string, Layer> cache;
  const std::string key = shape.name + "/" + weights;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cache.clear();  // one layer in memory at a time
  // One expert's matrices, cloned: every expert owns distinct memory (cold reads) and the values
  // do not matter to the cost.
  const auto gate = make_linear(weights, shape.i, shape.h, 1),
             up = make_linear(weights, shape.i, shape.h, 2),
             down = make_linear(weights, shape.h, shape.i, 3);
  Layer l;
  std::vector<std::shared_ptr<const moqe::ExpertMLP>> experts;
  for (int64_t e = 0; e < shape.e; ++e) {
    experts.push_back(std::make_shared<const moqe::ExpertMLP>(
        moqe::ExpertMLP::glu(gate.clone(), up.clone(), down.clone(), moqe::Activation::kSilu)));
    l.expert_bytes.push_back(experts.back()->weight_bytes());
  }
  moqe::RouterConfig rc;
  rc.kind = moqe::RouterKind::kSoftmaxTopK;
  rc.num_experts = shape.e;
  rc.top_k = shape.k;
  rc.norm_topk_prob = true;
  l.layer = std::make_unique<moqe::MoELayer>(
      moqe::Router(rc, moqe::synthetic_weights(shape.e, shape.h, 9), shape.h), std::move(experts));
  return cache.emplace(key, std::move(l)).first->second;
}

template <class T>
void BM_MoeLayer(benchmark::State& state, const Shape& shape, const std::string& weights) {
  const int64_t t = state.range(0), h = shape.h;
  Layer& l = get_layer(shape, weights);
  constexpr int kBatches = 16;
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<T> x(static_cast<size_t>(kBatches * t * h)), y(static_cast<size_t>(t * h));
  for (auto& v : x) v = T(g(rng));
  auto ws = l.layer->make_workspace(t);
  moqe::MoELayer::RunOptions opt;
  opt.num_threads = kThreads;
  moqe::bench::WallRate rate;
  double bytes = 0;
  int64_t i = 0;
  for (auto _ : state) {
    const T* xb = x.data() + (i++ % kBatches) * t * h;
    rate.start();
    l.layer->run(moqe::MatrixView<const T>(xb, t, h), moqe::MatrixView<T>(y.data(), t, h), ws, opt);
    rate.stop();
    for (int64_t e = 0; e < shape.e; ++e) {
      if (ws.routing.expert_load[e] > 0) bytes += static_cast<double>(l.expert_bytes[e]);
    }
    benchmark::DoNotOptimize(y.data());
  }
  rate.report(state, bytes / static_cast<double>(state.iterations()), static_cast<double>(t));
}

// BM_RouterLogits/<router>/impl:<impl>/tokens:<T>: the router's logits x [T, H] . Wg^T, through
// Router::logits (moqe's dense fp32 kernels, impl:kernels) beside the plain fp32 loop it replaced
// (matmul_nt_f32, impl:loop). Routers: mixtral (8 x 4096), qwen3 (128 x 2048), deepseek_v3
// (256 x 7168). items_per_second counts tokens.
void BM_RouterLogits(benchmark::State& state, int64_t e, int64_t h, bool kernels) {
  const int64_t t = state.range(0);
  moqe::RouterConfig rc;
  rc.kind = moqe::RouterKind::kSoftmaxTopK;
  rc.num_experts = e;
  rc.top_k = 2;
  const moqe::Router router(rc, moqe::synthetic_weights(e, h, 5), h);
  const std::vector<float> x = moqe::synthetic_weights(t, h, 6);
  std::vector<float> out(static_cast<size_t>(t * e));
  const moqe::MatrixView<const float> xv(x.data(), t, h);
  const moqe::MatrixView<float> ov(out.data(), t, e);
  const moqe::MatrixView<const float> wv(router.gate_weight().data(), e, h);
  for (auto _ : state) {
    if (kernels) {
      router.logits(xv, ov, kThreads);
    } else {
      moqe::matmul_nt_f32(xv, wv, ov, kThreads);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * t);
}

const bool registered = [] {
  struct RouterShape {
    const char* name;
    int64_t e, h;
  };
  for (const RouterShape r : {RouterShape{"mixtral", 8, 4096}, RouterShape{"qwen3", 128, 2048},
                              RouterShape{"deepseek_v3", 256, 7168}}) {
    for (const bool kernels : {false, true}) {
      const std::string name =
          std::string("BM_RouterLogits/") + r.name + (kernels ? "/impl:kernels" : "/impl:loop");
      benchmark::RegisterBenchmark(name.c_str(), BM_RouterLogits, r.e, r.h, kernels)
          ->ArgName("tokens")
          ->Arg(1)
          ->Arg(16)
          ->Arg(256)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  const Shape shapes[] = {{"mixtral", 4096, 14336, 8, 2}, {"e64k6", 2048, 1408, 64, 6}};
  for (const Shape& s : shapes) {
    for (const char* w : {"f16", "w8_channel", "w4_g128", "w3_g64", "w2_g128", "w4_g128_fast"}) {
      const std::string name = "BM_MoeLayer/" + s.name + "/" + w;
      benchmark::RegisterBenchmark(name.c_str(), BM_MoeLayer<float>, s, std::string(w))
          ->ArgName("tokens")
          ->Arg(1)
          ->Arg(8)
          ->Arg(64)
          ->Unit(benchmark::kMillisecond);
      if (std::string(w) == "w4_g128") {
        const std::string bf = "BM_MoeLayerBf16/" + s.name + "/" + w;
        benchmark::RegisterBenchmark(bf.c_str(), BM_MoeLayer<moqe::BFloat16>, s, std::string(w))
            ->ArgName("tokens")
            ->Arg(1)
            ->Arg(8)
            ->Arg(64)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  return true;
}();

}  // namespace
