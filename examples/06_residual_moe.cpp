// 06: a residual MoE (PR-MoE, DeepSpeed-MoE): every token passes a fixed dense MLP and one top-1
// expert; the two outputs are mixed by c = softmax(x . Wc^T). It reads one expert and the MLP per
// token, about the cost of top-2, with a model whose experts can be fewer or cheaper.
#include <moqe/moqe.hpp>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>

int main() {
  const int64_t e = 8, h = 128, i = 256, t = 16;
  auto mlp = [&](uint32_t seed) {
    auto lin = [&](int64_t n, int64_t k, uint32_t s) {
      return moqe::QuantizedLinear::from_f32(moqe::synthetic_weights(n, k, s), n, k);
    };
    return std::make_shared<const moqe::ExpertMLP>(moqe::ExpertMLP::glu(
        lin(i, h, seed), lin(i, h, seed + 1), lin(h, i, seed + 2), moqe::Activation::kGelu));
  };
  std::vector<std::shared_ptr<const moqe::ExpertMLP>> experts;
  for (int64_t x = 0; x < e; ++x) experts.push_back(mlp(static_cast<uint32_t>(10 * x)));
  moqe::RouterConfig c;
  c.kind = moqe::RouterKind::kSoftmaxTopK;
  c.num_experts = e;
  c.top_k = 1;
  const moqe::Router router(c, moqe::synthetic_weights(e, h, 99), h);
  moqe::ResidualMLP residual{mlp(1000), moqe::synthetic_weights(2, h, 98)};
  const moqe::MoELayer pr(router, experts, {}, residual);
  const moqe::MoELayer plain(router, experts);

  std::vector<float> x(static_cast<size_t>(t * h)), y(x.size()), y_moe(x.size()), y_mlp(x.size());
  std::mt19937 rng(4);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x) v = g(rng);
  const moqe::MatrixView<const float> xv(x.data(), t, h);
  auto ws = pr.make_workspace(t), ws2 = plain.make_workspace(t);
  pr.run(xv, moqe::MatrixView<float>(y.data(), t, h), ws);
  // Self-check against the pieces: the top-1 MoE output, the MLP output and the mixing.
  plain.run(xv, moqe::MatrixView<float>(y_moe.data(), t, h), ws2);
  std::vector<float> scratch(static_cast<size_t>(residual.mlp->scratch_floats(t)));
  residual.mlp->forward(xv, moqe::MatrixView<float>(y_mlp.data(), t, h), scratch.data());
  double max_diff = 0;
  for (int64_t r = 0; r < t; ++r) {
    const float l0 = moqe::dot_f32(residual.coefficient.data(), x.data() + r * h, h);
    const float l1 = moqe::dot_f32(residual.coefficient.data() + h, x.data() + r * h, h);
    const double c0 = 1.0 / (1.0 + std::exp(double(l1) - l0)), c1 = 1.0 - c0;
    for (int64_t k = 0; k < h; ++k) {
      max_diff = std::max(
          max_diff, std::fabs(y[r * h + k] - (c0 * y_moe[r * h + k] + c1 * y_mlp[r * h + k])));
    }
  }
  const int64_t expert_bytes = experts[0]->weight_bytes();
  std::printf(
      "PR-MoE: top-1 of %lld experts + a dense MLP; weights read per token: %lld bytes "
      "(top-2 would read %lld)\n",
      static_cast<long long>(e),
      static_cast<long long>(expert_bytes + residual.mlp->weight_bytes()),
      static_cast<long long>(2 * expert_bytes));
  std::printf("max |y - (c0 * moe + c1 * mlp)| = %.3g\n", max_diff);
  return max_diff < 1e-5 ? 0 : 1;
}
