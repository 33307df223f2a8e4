// Routers against hand-computed routings (docs/routing.md): every RouterKind, ties, capacity,
// inactive tokens, NaN logits, topk_indices and the configuration errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/moe/router.hpp"

using namespace moqe;

// Hand-computed routing cases. The gate weight is the identity and H = E, so the router logits
// are exactly the input rows (x . e_i adds only exact zeros to x_i) and can be written by hand.

namespace {

using Rows = std::vector<std::vector<float>>;

std::vector<float> identity(int64_t e) {
  std::vector<float> w(static_cast<size_t>(e * e), 0.0f);
  for (int64_t i = 0; i < e; ++i) w[i * e + i] = 1.0f;
  return w;
}

std::vector<float> flatten(const Rows& rows) {
  std::vector<float> x;
  for (const auto& r : rows) x.insert(x.end(), r.begin(), r.end());
  return x;
}

// Routes tokens whose logits are `logits` (one row per token).
Routing route_logits(const RouterConfig& c, const Rows& logits, const RouteOptions& o = {}) {
  const int64_t e = c.num_experts;
  Router router(c, identity(e), e);
  const std::vector<float> x = flatten(logits);
  Routing r;
  router.route(MatrixView<const float>(x.data(), static_cast<int64_t>(logits.size()), e), r, o);
  return r;
}

std::vector<double> softmax(const std::vector<float>& v) {
  double m = -INFINITY;
  for (float x : v) m = std::max(m, double(x));
  std::vector<double> p(v.size());
  double s = 0;
  for (size_t i = 0; i < v.size(); ++i) s += (p[i] = std::exp(double(v[i]) - m));
  for (auto& x : p) x /= s;
  return p;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// fp32 softmax: exp within an ulp or two, a sum of n terms (n - 1 roundings) and one division.
double softmax_tol(int64_t n) { return double(n + 4) * FLT_EPSILON; }

bool close(double got, double want, double rel) {
  return std::abs(got - want) <= rel * std::abs(want) + 1e-30;
}

std::vector<int32_t> ids_of(const Routing& r, int64_t t) {
  return {r.ids.begin() + t * r.slots, r.ids.begin() + (t + 1) * r.slots};
}

RouterConfig config(RouterKind kind, int64_t e, int64_t k) {
  RouterConfig c;
  c.kind = kind;
  c.num_experts = e;
  c.top_k = k;
  return c;
}

}  // namespace

TEST_CASE("router kind names round-trip", "[moe][router]") {
  for (RouterKind k : {RouterKind::kSoftmaxTopK, RouterKind::kMixtral, RouterKind::kDeepSeekV2,
                       RouterKind::kDeepSeekV3, RouterKind::kSwitch, RouterKind::kTask,
                       RouterKind::kExpertChoice}) {
    REQUIRE(parse_router_kind(to_string(k)) == k);
  }
  CHECK(to_string(RouterKind::kDeepSeekV3) == "deepseek_v3");
  CHECK_FALSE(parse_router_kind("top2").has_value());
}

TEST_CASE("softmax_topk: weights are the chosen probabilities, renormalized iff set",
          "[moe][router]") {
  const Rows logits = {{1.0f, 3.0f, 2.0f, 0.5f}, {-0.25f, 0.75f, -2.0f, 1.5f}};
  const std::vector<std::vector<int32_t>> want = {{1, 2}, {3, 1}};
  for (bool norm : {false, true}) {
    RouterConfig c = config(RouterKind::kSoftmaxTopK, 4, 2);
    c.norm_topk_prob = norm;
    const Routing r = route_logits(c, logits);
    REQUIRE(r.tokens == 2);
    REQUIRE(r.slots == 2);
    for (int64_t t = 0; t < 2; ++t) {
      REQUIRE(ids_of(r, t) == want[t]);
      const auto p = softmax(logits[t]);
      const double a = p[want[t][0]], b = p[want[t][1]];
      const double scale = norm ? 1.0 / (a + b) : 1.0;
      // Renormalizing adds a sum of 2 and a division: 3 more roundings.
      const double tol = softmax_tol(4) + (norm ? 3 * FLT_EPSILON : 0.0);
      CHECK(close(r.weight(t, 0), a * scale, tol));
      CHECK(close(r.weight(t, 1), b * scale, tol));
      CHECK(r.kept[t * 2] == 1);
      CHECK(r.kept[t * 2 + 1] == 1);
    }
    CHECK(r.passthrough == std::vector<uint8_t>{0, 0});
    CHECK(r.expert_load == std::vector<int64_t>{0, 2, 1, 1});
    CHECK(r.expert_dropped == std::vector<int64_t>{0, 0, 0, 0});
  }
}

TEST_CASE("top-k ties go to the lower expert index", "[moe][router]") {
  RouterConfig c = config(RouterKind::kSoftmaxTopK, 4, 2);
  CHECK(ids_of(route_logits(c, {{1, 1, 0, 1}}), 0) == std::vector<int32_t>{0, 1});
  c.top_k = 3;
  CHECK(ids_of(route_logits(c, {{1, 1, 0, 1}}), 0) == std::vector<int32_t>{0, 1, 3});
  CHECK(ids_of(route_logits(c, {{0, 2, 2, 2}}), 0) == std::vector<int32_t>{1, 2, 3});
  c = config(RouterKind::kMixtral, 4, 1);
  CHECK(ids_of(route_logits(c, {{-1, 5, -1, 5}}), 0) == std::vector<int32_t>{1});
}

TEST_CASE("mixtral always renormalizes", "[moe][router]") {
  const Rows logits = {{0.5f, -1.0f, 2.0f, 1.25f, 0.0f, -0.5f, 1.0f, 0.25f}};
  for (bool norm : {false, true}) {
    RouterConfig c = config(RouterKind::kMixtral, 8, 2);
    c.norm_topk_prob = norm;  // ignored: Mixtral renormalizes regardless
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{2, 3});
    const auto p = softmax(logits[0]);
    const double tol = softmax_tol(8) + 3 * FLT_EPSILON;
    CHECK(close(r.weight(0, 0), p[2] / (p[2] + p[3]), tol));
    CHECK(close(r.weight(0, 1), p[3] / (p[2] + p[3]), tol));
  }
}

TEST_CASE("deepseek_v2 greedy: softmax top-k times routed_scaling_factor", "[moe][router]") {
  const Rows logits = {{0.1f, 1.2f, -0.3f, 0.8f, 2.0f, -1.0f, 0.4f, 0.0f}};
  const auto p = softmax(logits[0]);
  RouterConfig c = config(RouterKind::kDeepSeekV2, 8, 3);
  c.topk_method = TopkMethod::kGreedy;
  c.routed_scaling_factor = 16.0f;
  const double tol = softmax_tol(8) + 4 * FLT_EPSILON;
  SECTION("not normalized") {
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{4, 1, 3});
    CHECK(close(r.weight(0, 0), 16 * p[4], tol));
    CHECK(close(r.weight(0, 1), 16 * p[1], tol));
    CHECK(close(r.weight(0, 2), 16 * p[3], tol));
  }
  SECTION("norm_topk_prob is ignored (transformers' DeepseekV2 never renormalizes)") {
    c.norm_topk_prob = true;
    for (int64_t k : {3, 1}) {
      c.top_k = k;
      const Routing r = route_logits(c, logits);
      REQUIRE(r.id(0, 0) == 4);
      CHECK(close(r.weight(0, 0), 16 * p[4], tol));
      if (k == 3) CHECK(close(r.weight(0, 2), 16 * p[3], tol));
    }
  }
}

TEST_CASE("deepseek_v2 group_limited_greedy: groups scored by their max", "[moe][router]") {
  // Groups of 2: g0 = {3.0, 2.9}, g1 = {2.95, -5}, g2 = {3.1, -5}, g3 = {-1, -1}. Group maxima
  // keep g2 and g0, so the third choice is expert 1 (2.9), where greedy takes expert 2 (2.95).
  const Rows logits = {{3.0f, 2.9f, 2.95f, -5.0f, 3.1f, -5.0f, -1.0f, -1.0f}};
  const auto p = softmax(logits[0]);
  RouterConfig c = config(RouterKind::kDeepSeekV2, 8, 3);
  c.routed_scaling_factor = 2.5f;
  c.topk_method = TopkMethod::kGreedy;
  CHECK(ids_of(route_logits(c, logits), 0) == std::vector<int32_t>{4, 0, 2});
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  c.n_group = 4;
  c.topk_group = 2;
  const Routing r = route_logits(c, logits);
  REQUIRE(ids_of(r, 0) == std::vector<int32_t>{4, 0, 1});
  const double tol = softmax_tol(8) + 2 * FLT_EPSILON;
  CHECK(close(r.weight(0, 0), 2.5 * p[4], tol));
  CHECK(close(r.weight(0, 1), 2.5 * p[0], tol));
  CHECK(close(r.weight(0, 2), 2.5 * p[1], tol));
}

TEST_CASE("deepseek_v2 group_limited_greedy: masked experts score 0, not -inf", "[moe][router]") {
  // p = softmax([0, 0, 200, -200]) is exactly [0, 0, 1, 0] in fp32 (exp underflows). Group 1
  // ({2, 3}) is kept; the second pick ties at 0 between the masked experts 0 and 1 (filled with 0,
  // the reference implementation's value) and the kept expert 3: the lowest index, 0, wins.
  RouterConfig c = config(RouterKind::kDeepSeekV2, 4, 2);
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  c.n_group = 2;
  c.topk_group = 1;
  const Routing r = route_logits(c, {{0.0f, 0.0f, 200.0f, -200.0f}});
  CHECK(ids_of(r, 0) == std::vector<int32_t>{2, 0});
  CHECK(r.weight(0, 0) == 1.0f);
  CHECK(r.weight(0, 1) == 0.0f);
}

TEST_CASE("deepseek_v3: the correction bias selects, the sigmoid scores weigh", "[moe][router]") {
  const Rows logits = {{2.0f, 1.0f, 0.0f, -1.0f}};
  RouterConfig c = config(RouterKind::kDeepSeekV3, 4, 2);
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 2.5f;
  // sigmoid: 1 ulp-ish per score; the normalization adds a sum and a division; then the scale.
  const double tol = 8 * FLT_EPSILON;
  SECTION("no bias: the two largest scores") {
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{0, 1});
    CHECK(close(r.weight(0, 0), 2.5 * sigmoid(2), tol));
    CHECK(close(r.weight(0, 1), 2.5 * sigmoid(1), tol));
  }
  SECTION("a bias changes the choice but not the weights") {
    c.correction_bias = {0.0f, 0.0f, 3.0f, 0.0f};
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{2, 0});
    CHECK(close(r.weight(0, 0), 2.5 * sigmoid(0), tol));  // 0.5 * 2.5, not (0.5 + 3) * 2.5
    CHECK(close(r.weight(0, 1), 2.5 * sigmoid(2), tol));
  }
  SECTION("norm_topk_prob divides by the sum of the unbiased scores") {
    c.correction_bias = {0.0f, 0.0f, 3.0f, 0.0f};
    c.norm_topk_prob = true;
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{2, 0});
    const double s = sigmoid(0) + sigmoid(2);
    CHECK(close(r.weight(0, 0), 2.5 * sigmoid(0) / s, tol));
    CHECK(close(r.weight(0, 1), 2.5 * sigmoid(2) / s, tol));
  }
  SECTION("the normalization adds 1e-20 to the sum") {
    // sigmoid(-60) = 8.76e-27: s / (2s + 1e-20) = 8.76e-7, where s / 2s would be 0.5.
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 1.0f;
    const Routing r = route_logits(c, {{-60.0f, -60.0f, -70.0f, -80.0f}});
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{0, 1});
    const double s = sigmoid(-60);
    CHECK(close(r.weight(0, 0), s / (2 * s + 1e-20), tol));
    CHECK(r.weight(0, 0) < 1e-6f);
  }
}

TEST_CASE("deepseek_v3: groups are scored by the sum of their top-2 biased scores",
          "[moe][router]") {
  // Groups of 4. By max, A wins; by the sum of the whole group, C; by the sum of the top 2, B.
  //   A: s = [.9933, 1.2e-4 x3]: max .9933, top-2 .9934, sum .9935
  //   B: s = [.8176, .8176, 1.2e-4 x2]: top-2 1.635, sum 1.635
  //   C: s = [.6225 x4]: max .6225, top-2 1.245, sum 2.49
  const Rows logits = {
      {5.0f, -9.0f, -9.0f, -9.0f, 1.5f, 1.5f, -9.0f, -9.0f, 0.5f, 0.5f, 0.5f, 0.5f}};
  RouterConfig c = config(RouterKind::kDeepSeekV3, 12, 2);
  c.n_group = 3;
  c.topk_group = 1;
  const Routing r = route_logits(c, logits);
  REQUIRE(ids_of(r, 0) == std::vector<int32_t>{4, 5});
  CHECK(close(r.weight(0, 0), sigmoid(1.5), 4 * FLT_EPSILON));
  CHECK(close(r.weight(0, 1), sigmoid(1.5), 4 * FLT_EPSILON));
  // Without groups the two best experts are 0 and 4.
  c.n_group = 1;
  CHECK(ids_of(route_logits(c, logits), 0) == std::vector<int32_t>{0, 4});
  // The bias enters the group score: lifting C's experts by 0.3 makes C the best group.
  c.n_group = 3;
  c.correction_bias = std::vector<float>(12, 0.0f);
  for (int i = 8; i < 12; ++i) c.correction_bias[i] = 0.3f;
  const Routing rb = route_logits(c, logits);
  REQUIRE(ids_of(rb, 0) == std::vector<int32_t>{8, 9});
  CHECK(close(rb.weight(0, 0), sigmoid(0.5), 4 * FLT_EPSILON));
}

TEST_CASE("deepseek_v3: masked groups never win, even over negative biased scores",
          "[moe][router]") {
  // Biased scores c = s + bias are all negative; group 0 ({0, 1}) scores -4.98 and is kept, group
  // 1 scores -8.60. Masked with 0 instead of -inf, experts 2 and 3 would win.
  RouterConfig c = config(RouterKind::kDeepSeekV3, 4, 2);
  c.n_group = 2;
  c.topk_group = 1;
  c.correction_bias = {-3.0f, -3.0f, -5.0f, -5.0f};
  const Rows logits = {{0.3f, -0.2f, 1.0f, 0.7f}};
  for (bool norm : {false, true}) {
    c.norm_topk_prob = norm;
    const Routing r = route_logits(c, logits);
    REQUIRE(ids_of(r, 0) == std::vector<int32_t>{0, 1});
    const double a = sigmoid(0.3), b = sigmoid(-0.2), s = norm ? a + b : 1.0;
    CHECK(close(r.weight(0, 0), a / s, 6 * FLT_EPSILON));
    CHECK(close(r.weight(0, 1), b / s, 6 * FLT_EPSILON));
  }
}

TEST_CASE("switch: top-1 weighted by the max probability, capacity per sequence in token order",
          "[moe][router]") {
  // Tokens 0..5 choose experts 0, 0, 0, 1, 0, 0.
  const Rows logits = {{2, 0, -1}, {1.5f, 0.2f, 0}, {3, 1, 1}, {0, 2, -2}, {0.5f, 0, 0}, {4, 0, 1}};
  const std::vector<int32_t> choice = {0, 0, 0, 1, 0, 0};
  RouterConfig c = config(RouterKind::kSwitch, 3, 1);
  c.switch_passthrough = true;  // transformers 4's semantics; false (the default) is tested below
  auto check_weights = [&](const Routing& r) {
    for (int64_t t = 0; t < 6; ++t) {
      REQUIRE(r.id(t, 0) == choice[t]);
      CHECK(close(r.weight(t, 0), softmax(logits[t])[choice[t]], softmax_tol(3)));
    }
  };
  SECTION("unlimited") {
    const Routing r = route_logits(c, logits);
    check_weights(r);
    CHECK(r.kept == std::vector<uint8_t>(6, 1));
    CHECK(r.passthrough == std::vector<uint8_t>(6, 0));
    CHECK(r.expert_load == std::vector<int64_t>{5, 1, 0});
  }
  SECTION("capacity 2, one sequence: the third and later tokens of expert 0 pass through") {
    c.expert_capacity = 2;
    const Routing r = route_logits(c, logits);
    check_weights(r);  // a dropped token keeps its weight: its output is p_max * x
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 0, 1, 0, 0});
    CHECK(r.passthrough == std::vector<uint8_t>{0, 0, 1, 0, 1, 1});
    CHECK(r.expert_load == std::vector<int64_t>{2, 1, 0});
    CHECK(r.expert_dropped == std::vector<int64_t>{3, 0, 0});
  }
  SECTION("capacity 2, two sequences of 3: the count restarts with each sequence") {
    c.expert_capacity = 2;
    const std::vector<int64_t> seq = {3, 3};
    RouteOptions o;
    o.sequence_lengths = seq;
    const Routing r = route_logits(c, logits, o);
    check_weights(r);
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 0, 1, 1, 1});
    CHECK(r.passthrough == std::vector<uint8_t>{0, 0, 1, 0, 0, 0});
    CHECK(r.expert_load == std::vector<int64_t>{4, 1, 0});
    CHECK(r.expert_dropped == std::vector<int64_t>{1, 0, 0});
  }
  SECTION("inactive tokens take no capacity") {
    c.expert_capacity = 2;
    const std::vector<uint8_t> active = {1, 0, 1, 1, 1, 1};
    RouteOptions o;
    o.active = active;
    const Routing r = route_logits(c, logits, o);
    CHECK(r.ids == std::vector<int32_t>{0, -1, 0, 1, 0, 0});
    CHECK(r.kept == std::vector<uint8_t>{1, 0, 1, 1, 0, 0});
    CHECK(r.passthrough == std::vector<uint8_t>{0, 0, 0, 0, 1, 1});
    CHECK(r.expert_load == std::vector<int64_t>{2, 1, 0});
  }
  SECTION("switch_passthrough = false (the default): a token over capacity outputs 0") {
    CHECK_FALSE(RouterConfig{}.switch_passthrough);
    c.expert_capacity = 2;
    c.switch_passthrough = false;
    const Routing r = route_logits(c, logits);
    check_weights(r);
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 0, 1, 0, 0});
    CHECK(r.passthrough == std::vector<uint8_t>(6, 0));
    CHECK(r.expert_dropped == std::vector<int64_t>{3, 0, 0});
  }
  SECTION("sequence lengths must cover the batch") {
    c.expert_capacity = 2;
    const std::vector<int64_t> seq = {3, 2};
    RouteOptions o;
    o.sequence_lengths = seq;
    CHECK_THROWS_WITH(route_logits(c, logits, o), Catch::Contains("sum to 5, not 6"));
    const std::vector<int64_t> neg = {7, -1};
    o.sequence_lengths = neg;
    CHECK_THROWS_WITH(route_logits(c, logits, o), Catch::Contains("negative sequence length -1"));
  }
}

TEST_CASE("capacity_factor: ceil(f * T * k / E) slots per expert, dropped in token order",
          "[moe][router]") {
  // Slots in token order: t0 -> [0, 1], t1 -> [1, 0], t2 -> [0, 1], t3 -> [0, 2], t4 -> [3, 0].
  const Rows logits = {{2, 1, 0, 0}, {1, 2, 0, 0}, {2, 1, 0, -1}, {2, -1, 1, 0}, {1, -1, 0, 2}};
  RouterConfig c = config(RouterKind::kSoftmaxTopK, 4, 2);
  SECTION("f = 1: capacity ceil(5 * 2 / 4) = 3") {
    c.capacity_factor = 1.0;
    const Routing r = route_logits(c, logits);
    REQUIRE(r.ids == std::vector<int32_t>{0, 1, 1, 0, 0, 1, 0, 2, 3, 0});
    // Expert 0's slots in order: t0, t1, t2 kept; t3, t4 dropped. Expert 1 has 3: all kept.
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 0, 1, 1, 0});
    CHECK(r.expert_load == std::vector<int64_t>{3, 3, 1, 1});
    CHECK(r.expert_dropped == std::vector<int64_t>{2, 0, 0, 0});
    CHECK(r.passthrough == std::vector<uint8_t>(5, 0));
    // A dropped slot keeps its id and weight; it is just not computed.
    const auto p3 = softmax(logits[3]);
    CHECK(close(r.weight(3, 0), p3[0], softmax_tol(4)));
  }
  SECTION("f = 0.3: capacity ceil(0.75) = 1") {
    c.capacity_factor = 0.3;
    const Routing r = route_logits(c, logits);
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 0, 0, 0, 0, 0, 1, 1, 0});
    CHECK(r.expert_load == std::vector<int64_t>{1, 1, 1, 1});
    CHECK(r.expert_dropped == std::vector<int64_t>{4, 2, 0, 0});
  }
  SECTION("T counts the active tokens only") {
    // 3 active tokens: capacity ceil(1 * 3 * 2 / 4) = 2.
    c.capacity_factor = 1.0;
    const std::vector<uint8_t> active = {1, 0, 1, 1, 0};
    RouteOptions o;
    o.active = active;
    const Routing r = route_logits(c, logits, o);
    CHECK(r.ids == std::vector<int32_t>{0, 1, -1, -1, 0, 1, 0, 2, -1, -1});
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 0, 0, 1, 1, 0, 1, 0, 0});
    CHECK(r.expert_load == std::vector<int64_t>{2, 2, 1, 0});
    CHECK(r.expert_dropped == std::vector<int64_t>{1, 0, 0, 0});
  }
}

TEST_CASE("task router: fixed experts and weights per task", "[moe][router]") {
  RouterConfig c = config(RouterKind::kTask, 5, 2);
  c.tasks = {{{2, 0}, {0.7f, 0.3f}}, {{1, 4}, {0.5f, 0.25f}}, {{3, 2}, {1.0f, 2.0f}}};
  const Router router(c, {}, 6);
  std::vector<float> x(4 * 6, 0.5f);  // the input does not matter
  const MatrixView<const float> xv(x.data(), 4, 6);
  Routing r;
  SECTION("one task for the batch") {
    RouteOptions o;
    o.task_id = 1;
    router.route(xv, r, o);
    for (int64_t t = 0; t < 4; ++t) {
      CHECK(ids_of(r, t) == std::vector<int32_t>{1, 4});
      CHECK(r.weight(t, 0) == 0.5f);
      CHECK(r.weight(t, 1) == 0.25f);
    }
    CHECK(r.kept == std::vector<uint8_t>(8, 1));
    CHECK(r.expert_load == std::vector<int64_t>{0, 4, 0, 0, 4});
  }
  SECTION("one task per token, with an inactive token") {
    const std::vector<int32_t> tasks = {2, 0, 2, 1};
    const std::vector<uint8_t> active = {1, 1, 0, 1};
    RouteOptions o;
    o.task_ids = tasks;
    o.active = active;
    router.route(xv, r, o);
    CHECK(r.ids == std::vector<int32_t>{3, 2, 2, 0, -1, -1, 1, 4});
    CHECK(r.weights == std::vector<float>{1.0f, 2.0f, 0.7f, 0.3f, 0, 0, 0.5f, 0.25f});
    CHECK(r.kept == std::vector<uint8_t>{1, 1, 1, 1, 0, 0, 1, 1});
    CHECK(r.expert_load == std::vector<int64_t>{1, 1, 2, 1, 1});
  }
  SECTION("a bad task id is an error naming it") {
    RouteOptions o;
    o.task_id = 3;
    CHECK_THROWS_WITH(router.route(xv, r, o), Catch::Contains("task id 3"));
    o.task_id = -1;
    CHECK_THROWS_WITH(router.route(xv, r, o), Catch::Contains("task id -1"));
    const std::vector<int32_t> tasks = {0, 1, 7, 0};
    o.task_id = 0;
    o.task_ids = tasks;
    CHECK_THROWS_WITH(router.route(xv, r, o), Catch::Contains("task id 7 of token 2"));
    const std::vector<int32_t> short_ids = {0, 1};
    o.task_ids = short_ids;
    CHECK_THROWS_AS(router.route(xv, r, o), Error);
  }
}

TEST_CASE("expert_choice: each expert takes its top-C tokens", "[moe][router]") {
  // E = 3, T = 6. Tokens 2 and 4 have identical logits (a tie: the lower token index wins).
  const Rows logits = {{2.0f, 0.0f, 1.0f},  {0.0f, 1.0f, 0.5f},  {1.0f, 1.0f, -1.0f},
                       {-1.0f, 0.5f, 2.0f}, {1.0f, 1.0f, -1.0f}, {0.2f, 0.1f, 0.0f}};
  const int64_t T = 6, E = 3;
  std::vector<std::vector<double>> p;
  for (const auto& l : logits) p.push_back(softmax(l));
  // Each expert's tokens by falling probability, ties to the lower token index.
  auto ranking = [&](int64_t e) {
    std::vector<int> order(T);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return float(p[a][e]) > float(p[b][e]);  // compare as the router does, in fp32
    });
    return order;
  };
  auto check = [&](const Routing& r, int64_t cap) {
    REQUIRE(r.slots == E);
    for (int64_t e = 0; e < E; ++e) {
      const auto order = ranking(e);
      std::vector<uint8_t> chosen(T, 0);
      for (int64_t j = 0; j < cap; ++j) chosen[order[j]] = 1;
      for (int64_t t = 0; t < T; ++t) {
        INFO("expert " << e << " token " << t);
        CHECK(r.ids[t * E + e] == (chosen[t] ? e : -1));
        CHECK(r.kept[t * E + e] == chosen[t]);
        if (chosen[t]) {
          CHECK(close(r.weights[t * E + e], p[t][e], softmax_tol(E)));
        } else {
          CHECK(r.weights[t * E + e] == 0.0f);
        }
      }
      CHECK(r.expert_load[e] == cap);
    }
  };
  RouterConfig c = config(RouterKind::kExpertChoice, E, 1);
  SECTION("C = ceil(T * k / E) = 2") { check(route_logits(c, logits), 2); }
  SECTION("C = ceil(6 * 2 / 3) = 4") {
    c.top_k = 2;
    check(route_logits(c, logits), 4);
  }
  SECTION("expert_capacity sets C") {
    c.expert_capacity = 3;
    check(route_logits(c, logits), 3);
  }
  SECTION("the tie between tokens 2 and 4 goes to token 2") {
    // Expert 1: token 1 (p = e / (1 + e + e^.5) = .5065), then tokens 2 and 4 tied at
    // e / (2e + e^-1) = .4683: with C = 2 token 2 is taken, token 4 is not.
    c.expert_capacity = 2;
    const Routing r = route_logits(c, logits);
    CHECK(r.ids[1 * E + 1] == 1);
    CHECK(r.ids[2 * E + 1] == 1);
    CHECK(r.ids[4 * E + 1] == -1);
  }
  SECTION("inactive tokens are never chosen and do not count in C") {
    const std::vector<uint8_t> active = {1, 1, 0, 1, 1, 0};
    RouteOptions o;
    o.active = active;
    const Routing r = route_logits(c, logits, o);  // C = ceil(4 / 3) = 2
    for (int64_t e = 0; e < E; ++e) {
      CHECK(r.ids[2 * E + e] == -1);
      CHECK(r.ids[5 * E + e] == -1);
      CHECK(r.expert_load[e] == 2);
    }
    // Expert 1 over the active tokens: token 1 (.5065), then token 4 (.4683) once 2 is inactive.
    CHECK(r.ids[1 * E + 1] == 1);
    CHECK(r.ids[4 * E + 1] == 1);
  }
}

TEST_CASE("inactive tokens get no slots and no load", "[moe][router]") {
  const Rows logits = {{1, 2, 3, 4}, {4, 3, 2, 1}, {0, 1, 5, 0.5f}};
  const std::vector<uint8_t> active = {1, 0, 1};
  RouteOptions o;
  o.active = active;
  for (RouterKind kind : {RouterKind::kSoftmaxTopK, RouterKind::kMixtral, RouterKind::kDeepSeekV2,
                          RouterKind::kDeepSeekV3, RouterKind::kSwitch}) {
    INFO(to_string(kind));
    RouterConfig c = config(kind, 4, kind == RouterKind::kSwitch ? 1 : 2);
    const Routing r = route_logits(c, logits, o);
    for (int64_t j = 0; j < r.slots; ++j) {
      CHECK(r.id(1, j) == -1);
      CHECK(r.kept[1 * r.slots + j] == 0);
      CHECK(r.weight(1, j) == 0.0f);
    }
    CHECK(r.id(0, 0) == 3);
    CHECK(r.id(2, 0) == 2);
    CHECK(std::accumulate(r.expert_load.begin(), r.expert_load.end(), int64_t{0}) == 2 * r.slots);
    CHECK(r.expert_load[0] == 0);
  }
  // The active mask must have one entry per token.
  const std::vector<uint8_t> wrong = {1, 0};
  o.active = wrong;
  CHECK_THROWS_WITH(route_logits(config(RouterKind::kSoftmaxTopK, 4, 2), logits, o),
                    Catch::Contains("2 entries for 3 tokens"));
}

TEST_CASE("expert_load counts the kept slots of every expert", "[moe][router]") {
  // 40 tokens with pseudo-random logits: the load is the histogram of the ids.
  const int64_t T = 40, E = 6, K = 3;
  Rows logits;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> row;
    for (int64_t e = 0; e < E; ++e) row.push_back(std::sin(float(7 * t + 3 * e * e + 1)));
    logits.push_back(row);
  }
  const Routing r = route_logits(config(RouterKind::kSoftmaxTopK, E, K), logits);
  std::vector<int64_t> hist(E, 0);
  for (int32_t id : r.ids) hist[id]++;
  CHECK(r.expert_load == hist);
  CHECK(std::accumulate(hist.begin(), hist.end(), int64_t{0}) == T * K);
}

TEST_CASE("NaN logits never crash and give defined ids", "[moe][router]") {
  // Gate rows 1 and 4 hold a NaN, so logits 1 and 4 are NaN and the others equal x; a NaN in x
  // makes every logit NaN (NaN * 0 is NaN).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t E = 8;
  std::vector<float> gate = identity(E);
  gate[1 * E + 1] = nan;
  gate[4 * E + 4] = nan;
  const std::vector<float> x = {nan,  0.0f, 0.0f, 0.0f,  0.0f, 0.0f, 0.0f, 0.0f,   // all NaN
                                0.5f, 0.0f, 1.0f, -1.0f, 0.0f, 2.0f, 0.0f, 0.25f,  // 1, 4 NaN
                                1.0f, 0.0f, 2.0f, 0.5f,  0.0f, 0.3f, 0.1f, 0.2f};
  for (RouterKind kind :
       {RouterKind::kSoftmaxTopK, RouterKind::kMixtral, RouterKind::kDeepSeekV2,
        RouterKind::kDeepSeekV3, RouterKind::kSwitch, RouterKind::kExpertChoice}) {
    INFO(to_string(kind));
    RouterConfig c = config(kind, E, kind == RouterKind::kSwitch ? 1 : 2);
    if (kind == RouterKind::kDeepSeekV3 || kind == RouterKind::kDeepSeekV2) {
      c.topk_method = TopkMethod::kGroupLimitedGreedy;
      c.n_group = 4;
      c.topk_group = 2;
    }
    const Router router(c, gate, E);
    Routing r;
    router.route(MatrixView<const float>(x.data(), 3, E), r);
    for (int64_t t = 0; t < 3; ++t) {
      std::vector<int32_t> ids = ids_of(r, t);
      for (int32_t id : ids) CHECK((id >= -1 && id < E));
      if (kind != RouterKind::kExpertChoice) {
        for (int32_t id : ids) CHECK(id >= 0);
        std::sort(ids.begin(), ids.end());
        CHECK(std::adjacent_find(ids.begin(), ids.end()) == ids.end());  // distinct
      }
    }
    if (kind == RouterKind::kSoftmaxTopK || kind == RouterKind::kMixtral) {
      // One NaN logit makes the whole softmax NaN: ranked by index.
      CHECK(ids_of(r, 0) == std::vector<int32_t>{0, 1});
      CHECK(ids_of(r, 1) == std::vector<int32_t>{0, 1});
    }
    if (kind == RouterKind::kDeepSeekV3) {
      // Sigmoid keeps a NaN to its expert, but it makes its group's top-2 sum NaN, which ranks
      // last: groups {6, 7} (1.062) and {2, 3} (1.0) are kept, then experts 2 and 7.
      CHECK(ids_of(r, 1) == std::vector<int32_t>{2, 7});
    }
    // Every router sees NaN logits for expert 1 and 4 on the clean row too.
    if (kind == RouterKind::kDeepSeekV3) CHECK(ids_of(r, 2) == std::vector<int32_t>{2, 3});
  }
}

TEST_CASE("topk_indices: largest first, ties to the lower index, NaN last, exclusions",
          "[moe][router]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> v = {1.0f, nan, 3.0f, 3.0f, -inf, nan, inf, -2.0f};
  std::vector<int32_t> out(8);
  topk_indices(v.data(), 8, 8, out.data());
  CHECK(out == std::vector<int32_t>{6, 2, 3, 0, 7, 4, 1, 5});
  topk_indices(v.data(), 8, 3, out.data());
  CHECK(std::vector<int32_t>(out.begin(), out.begin() + 3) == std::vector<int32_t>{6, 2, 3});
  const std::vector<uint8_t> excluded = {0, 0, 1, 0, 0, 0, 1, 0};
  topk_indices(v.data(), 8, 4, out.data(), excluded.data());
  CHECK(std::vector<int32_t>(out.begin(), out.begin() + 4) == std::vector<int32_t>{3, 0, 7, 4});
  // Fewer eligible entries than k: the rest are -1.
  const std::vector<uint8_t> most = {1, 1, 1, 1, 1, 0, 1, 1};
  topk_indices(v.data(), 8, 2, out.data(), most.data());
  CHECK(std::vector<int32_t>(out.begin(), out.begin() + 2) == std::vector<int32_t>{5, -1});
  // -0 and +0 compare equal: a tie, lower index first.
  const std::vector<float> zeros = {0.0f, -0.0f};
  topk_indices(zeros.data(), 2, 2, out.data());
  CHECK(std::vector<int32_t>(out.begin(), out.begin() + 2) == std::vector<int32_t>{0, 1});
}

TEST_CASE("check_router_config names the offending value", "[moe][router]") {
  auto reason = [](RouterConfig c) { return check_router_config(c); };
  CHECK(reason(config(RouterKind::kSoftmaxTopK, 8, 2)).empty());
  CHECK_THAT(reason(config(RouterKind::kSoftmaxTopK, 4, 5)),
             Catch::Contains("top_k 5") && Catch::Contains("num_experts 4"));
  CHECK_THAT(reason(config(RouterKind::kMixtral, 4, 0)), Catch::Contains("top_k 0"));
  CHECK_THAT(reason(config(RouterKind::kSoftmaxTopK, 0, 1)), Catch::Contains("got 0"));
  CHECK_THAT(reason(config(RouterKind::kExpertChoice, -2, 1)), Catch::Contains("got -2"));
  CHECK_THAT(reason(config(RouterKind::kSwitch, 4, 2)),
             Catch::Contains("top-1") && Catch::Contains("top_k 2"));
  // Expert choice allows k > E (each expert takes ceil(T k / E) tokens) but not k <= 0.
  CHECK(reason(config(RouterKind::kExpertChoice, 4, 6)).empty());
  CHECK_THAT(reason(config(RouterKind::kExpertChoice, 4, 0)), Catch::Contains("top_k 0"));
  {
    RouterConfig c = config(RouterKind::kSoftmaxTopK, 4, 2);
    c.capacity_factor = -1.5;
    CHECK_THAT(reason(c), Catch::Contains("capacity_factor -1.5"));
    c.capacity_factor = 0;
    c.expert_capacity = -3;
    CHECK_THAT(reason(c), Catch::Contains("expert_capacity -3"));
  }
  {
    RouterConfig c = config(RouterKind::kDeepSeekV3, 8, 2);
    c.n_group = 3;
    CHECK_THAT(reason(c), Catch::Contains("n_group 3") && Catch::Contains("num_experts 8"));
    c.n_group = 4;
    c.topk_group = 5;
    CHECK_THAT(reason(c), Catch::Contains("topk_group 5"));
    c.topk_group = 1;
    c.top_k = 3;  // one group of 2 experts cannot supply 3
    CHECK_THAT(reason(c), Catch::Contains("top_k 3"));
    c.top_k = 2;
    CHECK(reason(c).empty());
    c.n_group = 8;  // groups of 1 have no top 2
    c.topk_group = 2;
    CHECK_THAT(reason(c), Catch::Contains("1 experts per group"));
    c.n_group = 4;
    c.correction_bias = {0.0f, 0.0f, 0.0f};
    CHECK_THAT(reason(c), Catch::Contains("3 values for 8 experts"));
  }
  {
    RouterConfig c = config(RouterKind::kDeepSeekV2, 6, 2);
    c.n_group = 4;  // ignored by greedy
    CHECK(reason(c).empty());
    c.topk_method = TopkMethod::kGroupLimitedGreedy;
    CHECK_THAT(reason(c), Catch::Contains("n_group 4"));
  }
  {
    RouterConfig c = config(RouterKind::kTask, 4, 2);
    CHECK_THAT(reason(c), Catch::Contains("at least one task"));
    c.tasks = {{{0, 1}, {0.5f, 0.5f}}, {{2}, {1.0f}}};
    CHECK_THAT(reason(c), Catch::Contains("task 1 has 1 experts"));
    c.tasks = {{{0, 1}, {0.5f, 0.5f}}, {{2, 3}, {1.0f}}};
    CHECK_THAT(reason(c), Catch::Contains("task 1 has 2 experts and 1 weights"));
    c.tasks = {{{0, 7}, {0.5f, 0.5f}}};
    CHECK_THAT(reason(c), Catch::Contains("task 0 names expert 7 of 4"));
    c.tasks = {{{-1, 0}, {0.5f, 0.5f}}};
    CHECK_THAT(reason(c), Catch::Contains("expert -1"));
    c.tasks = {{{3, 3}, {0.5f, 0.5f}}};  // an expert runs each token at most once
    CHECK_THAT(reason(c), Catch::Contains("task 0 names expert 3 twice"));
    c.tasks = {{{3, 1}, {0.5f, 0.5f}}};
    CHECK(reason(c).empty());
  }
}

TEST_CASE("Router rejects a bad config and a gate weight of the wrong size", "[moe][router]") {
  CHECK_THROWS_WITH(Router(config(RouterKind::kMixtral, 4, 5), identity(4), 4),
                    Catch::Contains("mixtral router") && Catch::Contains("top_k 5"));
  CHECK_THROWS_WITH(Router(config(RouterKind::kSoftmaxTopK, 4, 2), std::vector<float>(15), 4),
                    Catch::Contains("holds 15 values, expected [4, 4]"));
  CHECK_THROWS_WITH(Router(config(RouterKind::kSoftmaxTopK, 4, 2), std::vector<float>(0), 0),
                    Catch::Contains("holds 0 values"));
  CHECK_NOTHROW(Router(config(RouterKind::kSoftmaxTopK, 4, 2), std::vector<float>(12), 3));
  // The input must match the hidden size.
  const Router r(config(RouterKind::kSoftmaxTopK, 4, 2), identity(4), 4);
  std::vector<float> x(2 * 5, 1.0f);
  Routing out;
  CHECK_THROWS_WITH(r.route(MatrixView<const float>(x.data(), 2, 5), out),
                    Catch::Contains("[2, 5]") && Catch::Contains("hidden size 4"));
  // The task router has no logits.
  RouterConfig tc = config(RouterKind::kTask, 2, 1);
  tc.tasks = {{{1}, {1.0f}}};
  const Router task(tc, {}, 4);
  std::vector<float> l(2);
  CHECK_THROWS_AS(
      task.logits(MatrixView<const float>(x.data(), 1, 4), MatrixView<float>(l.data(), 1, 2)),
      Error);
}

TEST_CASE("Routing buffers are reused between calls", "[moe][router]") {
  const Router router(config(RouterKind::kSoftmaxTopK, 4, 2), identity(4), 4);
  std::vector<float> x(16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(float(i));
  Routing r;
  router.route(MatrixView<const float>(x.data(), 4, 4), r);
  const int32_t* ids = r.ids.data();
  const float* w = r.weights.data();
  const float* scratch = r.scratch.data();
  const std::vector<int32_t> first(r.ids.begin(), r.ids.begin() + 2);
  router.route(MatrixView<const float>(x.data(), 1, 4), r);
  CHECK(r.tokens == 1);
  CHECK(r.ids.size() == 2);
  CHECK(r.ids == first);
  CHECK(r.ids.data() == ids);
  CHECK(r.weights.data() == w);
  CHECK(r.scratch.data() == scratch);
  // Zero tokens.
  router.route(MatrixView<const float>(x.data(), 0, 4), r);
  CHECK(r.tokens == 0);
  CHECK(r.ids.empty());
  CHECK(r.expert_load == std::vector<int64_t>(4, 0));
}
