// 02: route tokens with a DeepSeek-V3 style router (sigmoid scores, correction bias, 8 groups of
// which 4 are kept, top-6 of 64 experts) and a capacity-limited softmax router, and print the
// load statistics a server would log.
#include <moqe/moqe.hpp>

#include <algorithm>
#include <cstdio>
#include <random>

int main() {
  const int64_t e = 64, h = 256, t = 512;
  std::mt19937 rng(2);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(t * h));
  for (auto& v : x) v = g(rng);
  const moqe::MatrixView<const float> xv(x.data(), t, h);

  moqe::RouterConfig c;
  c.kind = moqe::RouterKind::kDeepSeekV3;
  c.num_experts = e;
  c.top_k = 6;
  c.n_group = 8;
  c.topk_group = 4;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5f;
  c.correction_bias.resize(e);
  for (auto& b : c.correction_bias) b = 0.05f * g(rng);
  const moqe::Router router(c, moqe::synthetic_weights(e, h, 3), h);
  moqe::Routing r;
  router.route(xv, r);

  const auto [mn, mx] = std::minmax_element(r.expert_load.begin(), r.expert_load.end());
  std::printf("deepseek_v3 router: %lld tokens, top-%lld of %lld experts in 4 of 8 groups\n",
              static_cast<long long>(t), static_cast<long long>(c.top_k),
              static_cast<long long>(e));
  std::printf("  load per expert: min %lld, max %lld, mean %.1f (max/mean %.2f)\n",
              static_cast<long long>(*mn), static_cast<long long>(*mx), double(t * c.top_k) / e,
              static_cast<double>(*mx) / (double(t * c.top_k) / e));
  std::printf("  token 0 -> experts");
  for (int64_t j = 0; j < c.top_k; ++j) {
    std::printf(" %d (w %.3f)", r.id(0, j), r.weight(0, j));
  }
  std::printf("\n");
  // Self-checks: every slot is counted once, each token stays within 4 groups, and the weights
  // sum to the scaling factor (normalized, then scaled).
  int64_t total = 0;
  for (int64_t n : r.expert_load) total += n;
  if (total != t * c.top_k) return 1;
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int> groups;
    float sum = 0;
    for (int64_t j = 0; j < c.top_k; ++j) {
      groups.push_back(r.id(i, j) / 8);
      sum += r.weight(i, j);
    }
    std::sort(groups.begin(), groups.end());
    if (std::unique(groups.begin(), groups.end()) - groups.begin() > 4) return 1;
    if (std::abs(sum - 2.5f) > 1e-5f) return 1;
  }

  // Capacity: a softmax top-2 router admitting ceil(1.0 * T * k / E) slots per expert.
  moqe::RouterConfig cap;
  cap.kind = moqe::RouterKind::kSoftmaxTopK;
  cap.num_experts = 8;
  cap.top_k = 2;
  cap.capacity_factor = 1.0;
  const moqe::Router small(cap, moqe::synthetic_weights(8, h, 4), h);
  small.route(xv, r);
  int64_t dropped = 0, kept = 0;
  std::printf("softmax top-2 of 8 with capacity factor 1.0 (capacity %lld):\n",
              static_cast<long long>((t * 2 + 7) / 8));
  for (int64_t i = 0; i < 8; ++i) {
    std::printf("  expert %lld: %lld kept, %lld dropped\n", static_cast<long long>(i),
                static_cast<long long>(r.expert_load[i]),
                static_cast<long long>(r.expert_dropped[i]));
    dropped += r.expert_dropped[i];
    kept += r.expert_load[i];
  }
  std::printf("  %lld of %lld slots dropped (their outputs are 0; the residual carries them)\n",
              static_cast<long long>(dropped), static_cast<long long>(t * 2));
  return kept + dropped == t * 2 ? 0 : 1;
}
