// The device router (moqe::cuda::DeviceRouter) against moqe::Router on the host, for every
// RouterKind and option, with poisoned outputs. Two kinds of input:
//  - exact logits: the gate is one-hot (Wg[e][e] = 1, 0 elsewhere), so every logit is exactly
//    x[t][e] in any summation order and both sides rank bit-identical values. Logits lie on a
//    0.25 grid, so experts often tie exactly (the tie rule is exercised) and otherwise differ by
//    far more than the rounding of exp; the routing must then match exactly (ids, kept,
//    passthrough, loads, drops) and the weights to the rounding of exp and the sums.
//  - random data: logits differ from the host's by fp32 summation order, at most
//    gamma_H * sum_h |x_h w_h| each (gamma_H = H u / (1 - H u), u = 2^-24, for any order), so a
//    token's ids are compared only where every comparison that decides them has a margin above
//    twice that bound (plus the rounding of exp); at least 3/4 of the tokens must qualify.
// Weights: exp is within 2 ulp on the device and 1 on the host, the softmax sums of E terms (the
// device adds across a warp, in another order) are each within (E - 1) u of the exact sum, the
// renormalization adds 2k u: relative tolerance (4E + 4k + 32) u, plus 4 * bound for random data
// (the logit error enters both the numerator and the sum). Exact ties stay exact on the device
// (every lane divides by the same sum), so the exact-logit routing is still fully determined.
// Without a device each test reports "SKIPPED: no CUDA device".
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cuda/require_device.hpp"
#include "moqe/cuda/router.hpp"
#include "moqe/cuda/runtime.hpp"

using namespace moqe;

namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24

struct Inputs {
  int64_t tokens = 0, hidden = 0, ldx = 0;
  std::vector<float> x;  // [tokens, ldx]
  std::vector<uint8_t> active;
  std::vector<int32_t> task_ids;
  int32_t task_id = 0;
  std::vector<int64_t> sequences;
};

// Fills every output and the scratch with 0x5a bytes: an element the device leaves unwritten
// shows up as id 0x5a5a5a5a or weight 1.5e16.
void poison(cuda::DeviceRouting& r) {
  for (cuda::DeviceBuffer* b : {&r.ids, &r.weights, &r.kept, &r.passthrough, &r.scratch}) {
    std::vector<uint8_t> junk(b->size(), 0x5a);
    b->upload(junk.data(), junk.size());
  }
}

Routing host_route(const Router& router, const Inputs& in) {
  RouteOptions o;
  o.active = in.active;
  o.task_id = in.task_id;
  o.task_ids = in.task_ids;
  o.sequence_lengths = in.sequences;
  Routing out;
  std::vector<float> one(1);
  const float* x = in.x.empty() ? one.data() : in.x.data();
  const int64_t h = router.kind() == RouterKind::kTask ? in.hidden : router.hidden();
  router.route(MatrixView<const float>(x, in.tokens, h, std::max<int64_t>(in.ldx, h)), out, o);
  return out;
}

// Routes on the device into a poisoned routing with room for `extra` more tokens.
Routing device_route(const cuda::DeviceRouter& router, const Inputs& in, int64_t extra = 3) {
  cuda::DeviceRouting r = router.make_routing(in.tokens + extra);
  poison(r);
  cuda::DeviceBuffer x(std::max<size_t>(in.x.size(), 1) * sizeof(float));
  x.upload(std::span<const float>(in.x));
  cuda::DeviceBuffer active(in.active.size()), task_ids(in.task_ids.size() * sizeof(int32_t));
  active.upload(std::span<const uint8_t>(in.active));
  task_ids.upload(std::span<const int32_t>(in.task_ids));
  cuda::DeviceRouteOptions o;
  o.active = in.active.empty() ? nullptr : active.as<uint8_t>();
  o.task_id = in.task_id;
  o.task_ids = in.task_ids.empty() ? nullptr : task_ids.as<int32_t>();
  o.sequence_lengths = in.sequences;
  router.route(x.as<float>(), in.tokens, std::max<int64_t>(in.ldx, router.hidden()), r, o);
  Routing out;
  cuda::download(r, out);
  return out;
}

// Wg [E, H], H >= E: 1 on the diagonal (NaN for expert nan_expert), 0 elsewhere.
std::vector<float> one_hot_gate(int64_t e, int64_t h, int64_t nan_expert = -1) {
  std::vector<float> w(static_cast<size_t>(e * h), 0.0f);
  for (int64_t i = 0; i < e; ++i) w[i * h + i] = i == nan_expert ? std::nanf("") : 1.0f;
  return w;
}

// x [T, ldx]: columns [0, E) the logits, multiples of 0.25 in [-4, 4] (+ `hot` on expert 0 and
// hot/2 on expert 1, multiples of 0.25 too, to overload them), then noise up to H (times 0
// weights), then NaN padding up to ldx (never read).
Inputs exact_inputs(int64_t t_count, int64_t e, int64_t h, std::mt19937& rng, float hot = 0) {
  Inputs in;
  in.tokens = t_count;
  in.hidden = h;
  in.ldx = h + 3;
  in.x.assign(static_cast<size_t>(t_count * in.ldx), std::nanf(""));
  std::uniform_int_distribution<int> grid(-16, 16);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (int64_t t = 0; t < t_count; ++t) {
    float* row = &in.x[static_cast<size_t>(t * in.ldx)];
    for (int64_t i = 0; i < h; ++i) row[i] = i < e ? 0.25f * grid(rng) : noise(rng);
    row[0] += hot;
    if (e > 1) row[1] += hot / 2;
  }
  return in;
}

// x ~ N(0, 1) [T, ldx] with NaN padding; the gate ~ N(0, 1/H).
Inputs random_inputs(int64_t t_count, int64_t h, std::mt19937& rng) {
  Inputs in;
  in.tokens = t_count;
  in.hidden = h;
  in.ldx = h + 5;
  in.x.assign(static_cast<size_t>(t_count * in.ldx), std::nanf(""));
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t t = 0; t < t_count; ++t) {
    for (int64_t i = 0; i < h; ++i) in.x[static_cast<size_t>(t * in.ldx + i)] = g(rng);
  }
  return in;
}

std::vector<float> random_gate(int64_t e, int64_t h, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f / std::sqrt(static_cast<float>(h)));
  std::vector<float> w(static_cast<size_t>(e * h));
  for (auto& v : w) v = g(rng);
  return w;
}

std::vector<uint8_t> every_nth_inactive(int64_t t_count, int64_t n) {
  std::vector<uint8_t> a(static_cast<size_t>(t_count), 1);
  for (int64_t t = 0; t < t_count; t += n) a[t] = 0;
  return a;
}

// --- which decisions are determined despite rounding ----------------------------------------

// A value being ranked: `key` equal means bit-identical inputs on both sides (an exact tie).
struct Item {
  double v;
  uint64_t key;
  int64_t i;
};

bool item_above(const Item& a, const Item& b) {
  const bool na = std::isnan(a.v), nb = std::isnan(b.v);
  if (na != nb) return nb;
  if (!na && a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}

// Two neighbours in rank order keep their order on both sides.
bool ordered(const Item& a, const Item& b, double tol) {
  if (std::isnan(a.v) || std::isnan(b.v)) return true;  // NaN is last on both sides
  return a.key == b.key || a.v - b.v > tol;
}

// The first n of `items` in rank order are the same, in the same order, on both sides.
bool prefix_decided(std::vector<Item> items, int64_t n, double tol) {
  std::sort(items.begin(), items.end(), item_above);
  for (int64_t j = 0; j < n && j + 1 < static_cast<int64_t>(items.size()); ++j) {
    if (!ordered(items[j], items[j + 1], tol)) return false;
  }
  return true;
}

// The set of the first n (in any order) is the same on both sides.
bool set_decided(std::vector<Item> items, int64_t n, double tol) {
  std::sort(items.begin(), items.end(), item_above);
  if (n <= 0 || n >= static_cast<int64_t>(items.size())) return true;
  const Item& last = items[n - 1];
  if (ordered(last, items[n], tol) && last.key != items[n].key) return true;
  for (const Item& it : items) {  // an exact tie at the boundary: nothing else may be near it
    if (std::abs(it.v - last.v) <= tol && it.key != last.key) return false;
  }
  return true;
}

uint64_t mix(uint64_t a, uint64_t b) { return a * 0x9e3779b97f4a7c15ull ^ (b + (a >> 29)); }

struct Shadow {
  int64_t e = 0;
  std::vector<double> logits;     // [T, E], in double
  std::vector<uint64_t> keys;     // [T, E]
  std::vector<double> bound;      // [T]: the largest logit error bound of the token
  std::vector<uint64_t> row_key;  // [T]
  double bound_max = 0;
};

// exact: one-hot gate inputs (logits exact on both sides, keys are the logits' bits).
Shadow shadow(const Router& r, const Inputs& in, bool exact) {
  Shadow s;
  const int64_t e = r.num_experts(), h = r.hidden(), t_count = in.tokens;
  s.e = e;
  s.logits.resize(static_cast<size_t>(t_count * e));
  s.keys.resize(s.logits.size());
  s.bound.assign(static_cast<size_t>(t_count), 0.0);
  s.row_key.assign(static_cast<size_t>(t_count), 0);
  const std::span<const float> w = r.gate_weight();
  const double gamma = h * kU / (1 - h * kU);
  for (int64_t t = 0; t < t_count; ++t) {
    const float* x = &in.x[static_cast<size_t>(t * in.ldx)];
    uint64_t rk = 1;
    for (int64_t i = 0; i < e; ++i) {
      double dot = 0, mag = 0;
      for (int64_t j = 0; j < h; ++j) {
        dot += double(x[j]) * double(w[i * h + j]);
        mag += std::abs(double(x[j]) * double(w[i * h + j]));
      }
      const float lf = static_cast<float>(dot);
      s.logits[t * e + i] = dot;
      s.keys[t * e + i] = exact ? std::bit_cast<uint32_t>(lf) : static_cast<uint64_t>(t * e + i);
      rk = mix(rk, s.keys[t * e + i]);
      if (!exact) s.bound[t] = std::max(s.bound[t], gamma * mag);
    }
    s.row_key[t] = exact ? rk : static_cast<uint64_t>(t);
    s.bound_max = std::max(s.bound_max, s.bound[t]);
  }
  return s;
}

double softmax_slack(int64_t e) { return (4.0 * e + 16) * kU; }

// Tokens whose ids (in slot order) are decided (token-choice routers).
std::vector<uint8_t> decided_tokens(const Router& r, const Inputs& in, const Shadow& s) {
  const RouterConfig& c = r.config();
  const int64_t e = c.num_experts, k = c.top_k, t_count = in.tokens;
  std::vector<uint8_t> ok(static_cast<size_t>(t_count), 1);
  if (c.kind == RouterKind::kTask) return ok;
  for (int64_t t = 0; t < t_count; ++t) {
    const double* lg = &s.logits[t * e];
    const uint64_t* key = &s.keys[t * e];
    const double tol = 2 * s.bound[t] + softmax_slack(e);
    std::vector<Item> items;
    const bool grouped =
        c.kind == RouterKind::kDeepSeekV3 ||
        (c.kind == RouterKind::kDeepSeekV2 && c.topk_method == TopkMethod::kGroupLimitedGreedy);
    if (!grouped) {
      for (int64_t i = 0; i < e; ++i) items.push_back({lg[i], key[i], i});
      ok[t] = prefix_decided(items, k, tol);
      continue;
    }
    const int64_t gsize = e / c.n_group;
    std::vector<double> v(static_cast<size_t>(e));
    std::vector<uint64_t> vk(static_cast<size_t>(e));
    double vtol = tol, gtol = tol;
    for (int64_t i = 0; i < e; ++i) {
      if (c.kind == RouterKind::kDeepSeekV3) {
        // The slack (below) covers exp, the division and the bias addition.
        const float b = c.correction_bias.empty() ? 0.0f : c.correction_bias[i];
        v[i] = 1.0 / (1.0 + std::exp(-lg[i])) + b;
        vk[i] = mix(key[i], std::bit_cast<uint32_t>(b));
      } else {
        v[i] = lg[i];
        vk[i] = key[i];
      }
    }
    if (c.kind == RouterKind::kDeepSeekV3) {
      // sigmoid' <= 1/4: the two sides' s differ by at most 2 * bound / 4.
      vtol = 0.5 * s.bound[t] + 64 * kU;
      gtol = 2 * vtol;
    }
    std::vector<Item> groups;
    for (int64_t g = 0; g < c.n_group; ++g) {
      std::vector<Item> in_group;
      for (int64_t i = g * gsize; i < (g + 1) * gsize; ++i) in_group.push_back({v[i], vk[i], i});
      std::sort(in_group.begin(), in_group.end(), item_above);
      if (c.kind == RouterKind::kDeepSeekV3) {
        groups.push_back({in_group[0].v + in_group[1].v, mix(in_group[0].key, in_group[1].key), g});
      } else {
        groups.push_back({in_group[0].v, in_group[0].key, g});
      }
    }
    bool decided = prefix_decided(groups, c.topk_group, gtol);
    std::sort(groups.begin(), groups.end(), item_above);
    for (int64_t j = 0; j < c.topk_group; ++j) {
      for (int64_t i = groups[j].i * gsize; i < (groups[j].i + 1) * gsize; ++i) {
        items.push_back({v[i], vk[i], i});
      }
    }
    decided = decided && prefix_decided(items, k, vtol);
    ok[t] = decided;
  }
  return ok;
}

bool weight_close(float a, float b, double rel) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::abs(double(a) - double(b)) <=
         rel * std::max(std::abs(double(a)), std::abs(double(b)));
}

double weight_tolerance(const RouterConfig& c, const Shadow& s) {
  if (c.kind == RouterKind::kTask) return 0;
  return 4 * s.bound_max + (4.0 * c.num_experts + 4.0 * c.top_k + 32) * kU;
}

void require_token(const Routing& ref, const Routing& dev, int64_t t, double rel) {
  INFO("token " << t);
  for (int64_t j = 0; j < ref.slots; ++j) {
    INFO("slot " << j);
    REQUIRE(dev.id(t, j) == ref.id(t, j));
    REQUIRE(dev.kept[t * ref.slots + j] == ref.kept[t * ref.slots + j]);
    REQUIRE(weight_close(dev.weight(t, j), ref.weight(t, j), rel));
  }
  REQUIRE(dev.passthrough[t] == ref.passthrough[t]);
}

// Every token (and the loads and drops) must match.
void require_same(const Routing& ref, const Routing& dev, double rel) {
  REQUIRE(dev.tokens == ref.tokens);
  REQUIRE(dev.slots == ref.slots);
  REQUIRE(dev.num_experts == ref.num_experts);
  for (int64_t t = 0; t < ref.tokens; ++t) require_token(ref, dev, t, rel);
  REQUIRE(dev.expert_load == ref.expert_load);
  REQUIRE(dev.expert_dropped == ref.expert_dropped);
}

// A token whose ids are not decided must still be a valid routing: distinct experts, kept, finite
// positive weights (or none at all when inactive).
void require_plausible(const Routing& ref, const Routing& dev, int64_t t) {
  INFO("undecided token " << t);
  std::vector<int32_t> seen;
  for (int64_t j = 0; j < ref.slots; ++j) {
    const int32_t id = dev.id(t, j);
    REQUIRE((ref.id(t, j) < 0) == (id < 0));
    if (id < 0) continue;
    REQUIRE(id < ref.num_experts);
    REQUIRE(std::find(seen.begin(), seen.end(), id) == seen.end());
    seen.push_back(id);
    REQUIRE(dev.weight(t, j) >= 0);
  }
}

// Routes `in` both ways and compares: everything when `exact` routing is guaranteed (exact logits
// and no router that needs a margin), else the decided tokens (at least min_decided of them).
void check(const Router& router, const Inputs& in, bool exact_logits, double min_decided = 0.75) {
  const cuda::DeviceRouter dr(router);
  const Routing ref = host_route(router, in);
  const Routing dev = device_route(dr, in);
  const Shadow s = router.kind() == RouterKind::kTask ? Shadow{} : shadow(router, in, exact_logits);
  const double rel = weight_tolerance(router.config(), s);
  if (router.kind() == RouterKind::kTask) {
    require_same(ref, dev, rel);
    return;
  }
  const std::vector<uint8_t> ok = decided_tokens(router, in, s);
  const int64_t n_ok = std::count(ok.begin(), ok.end(), uint8_t{1});
  INFO(to_string(router.kind()) << ": " << n_ok << " of " << in.tokens << " tokens decided");
  REQUIRE(double(n_ok) >= min_decided * double(in.tokens));
  if (n_ok == in.tokens) {
    require_same(ref, dev, rel);
    return;
  }
  REQUIRE(dev.tokens == ref.tokens);
  for (int64_t t = 0; t < in.tokens; ++t) {
    if (ok[t]) {
      require_token(ref, dev, t, rel);
    } else {
      require_plausible(ref, dev, t);
    }
  }
}

Router make_router(RouterConfig c, std::vector<float> gate, int64_t h) {
  return Router(std::move(c), std::move(gate), h);
}

RouterConfig softmax_config(int64_t e, int64_t k, bool norm) {
  RouterConfig c;
  c.kind = RouterKind::kSoftmaxTopK;
  c.num_experts = e;
  c.top_k = k;
  c.norm_topk_prob = norm;
  return c;
}

// The token-choice configurations over E = 16 experts.
std::vector<RouterConfig> token_choice_configs(std::mt19937& rng, bool exact_bias) {
  std::vector<RouterConfig> out;
  out.push_back(softmax_config(16, 1, false));
  out.push_back(softmax_config(16, 4, false));
  out.push_back(softmax_config(16, 4, true));
  RouterConfig mixtral = softmax_config(16, 2, false);
  mixtral.kind = RouterKind::kMixtral;
  out.push_back(mixtral);
  RouterConfig sw = softmax_config(16, 1, false);
  sw.kind = RouterKind::kSwitch;
  out.push_back(sw);
  RouterConfig v2 = softmax_config(16, 3, true);  // norm_topk_prob is ignored by V2
  v2.kind = RouterKind::kDeepSeekV2;
  v2.routed_scaling_factor = 2.5f;
  out.push_back(v2);
  v2.topk_method = TopkMethod::kGroupLimitedGreedy;
  v2.n_group = 4;
  v2.topk_group = 2;
  out.push_back(v2);
  v2.n_group = 8;  // two experts per group, top_k = all of the kept ones
  v2.topk_group = 1;
  v2.top_k = 2;
  out.push_back(v2);
  RouterConfig v3 = softmax_config(16, 4, true);
  v3.kind = RouterKind::kDeepSeekV3;
  v3.n_group = 4;
  v3.topk_group = 2;
  v3.routed_scaling_factor = 2.5f;
  out.push_back(v3);  // no correction bias
  std::uniform_int_distribution<int> bit(0, 1);
  std::normal_distribution<float> small(0.0f, 0.05f);
  v3.correction_bias.resize(16);
  for (auto& b : v3.correction_bias) b = exact_bias ? float(bit(rng)) : small(rng);
  out.push_back(v3);
  v3.norm_topk_prob = false;
  v3.n_group = 2;
  v3.topk_group = 1;
  out.push_back(v3);
  return out;
}

}  // namespace

TEST_CASE("cuda router: token-choice routers on exact logits, ties, inactive tokens", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(11);
  const int64_t e = 16, h = 21;
  for (const RouterConfig& c : token_choice_configs(rng, true)) {
    const Router router = make_router(c, one_hot_gate(e, h), h);
    for (int64_t t_count : {0, 1, 2, 37, 300}) {
      for (bool mask : {false, true}) {
        INFO(to_string(c.kind) << " top_k " << c.top_k << " T " << t_count << " mask " << mask);
        Inputs in = exact_inputs(t_count, e, h, rng);
        if (mask) in.active = every_nth_inactive(t_count, 3);
        // Softmax-family ids are fully determined by exact logits; V3 sums sigmoids of groups,
        // whose exact ties may round apart, so its tokens are margin-checked.
        check(router, in, true, c.kind == RouterKind::kDeepSeekV3 ? 0.75 : 1.0);
      }
    }
  }
}

TEST_CASE("cuda router: token-choice routers on random data, margin-checked", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(12);
  for (int64_t h : {64, 257}) {
    for (const RouterConfig& c : token_choice_configs(rng, false)) {
      const Router router = make_router(c, random_gate(c.num_experts, h, rng), h);
      for (int64_t t_count : {1, 5, 200}) {
        INFO(to_string(c.kind) << " top_k " << c.top_k << " H " << h << " T " << t_count);
        Inputs in = random_inputs(t_count, h, rng);
        if (t_count > 1) in.active = every_nth_inactive(t_count, 7);
        check(router, in, false, t_count < 10 ? 0.0 : 0.75);
      }
    }
  }
}

TEST_CASE("cuda router: larger expert counts and hidden sizes (logit tiling)", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(13);
  RouterConfig c = softmax_config(160, 6, true);
  c.kind = RouterKind::kDeepSeekV2;
  c.topk_method = TopkMethod::kGroupLimitedGreedy;
  c.n_group = 8;
  c.topk_group = 3;
  c.routed_scaling_factor = 16.0f;
  const int64_t h = 1031;
  check(make_router(c, random_gate(160, h, rng), h), random_inputs(67, h, rng), false);
  RouterConfig v3 = softmax_config(256, 8, true);
  v3.kind = RouterKind::kDeepSeekV3;
  v3.n_group = 8;
  v3.topk_group = 4;
  v3.routed_scaling_factor = 2.5f;
  v3.correction_bias.resize(256);
  std::normal_distribution<float> small(0.0f, 0.05f);
  for (auto& b : v3.correction_bias) b = small(rng);
  check(make_router(v3, random_gate(256, 300, rng), 300), random_inputs(33, 300, rng), false);
}

TEST_CASE("cuda router: NaN logits rank last", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(14);
  const int64_t e = 16, h = 17;
  for (const RouterConfig& c : token_choice_configs(rng, true)) {
    INFO(to_string(c.kind) << " top_k " << c.top_k);
    // Expert 5's logit is NaN for every token: softmax rows become NaN (ids by index, NaN
    // weights) on both sides; V3's sigmoid keeps the NaN to expert 5, which ranks last.
    const Router router = make_router(c, one_hot_gate(e, h, 5), h);
    check(router, exact_inputs(40, e, h, rng), true,
          c.kind == RouterKind::kDeepSeekV3 ? 0.75 : 1.0);
  }
}

TEST_CASE("cuda router: switch expert capacity per sequence, passthrough or drop", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(15);
  const int64_t e = 4, h = 6;
  for (bool passthrough : {true, false}) {
    for (int64_t capacity : {1, 2, 5}) {
      RouterConfig c = softmax_config(e, 1, false);
      c.kind = RouterKind::kSwitch;
      c.expert_capacity = capacity;
      c.switch_passthrough = passthrough;
      const Router router = make_router(c, one_hot_gate(e, h), h);
      INFO("capacity " << capacity << " passthrough " << passthrough);
      // Experts 0 and 1 are overloaded (hot logits), so every sequence overflows them.
      Inputs in = exact_inputs(32, e, h, rng, 3.0f);
      check(router, in, true, 1.0);  // one sequence
      in.sequences = {5, 0, 17, 1, 9};
      check(router, in, true, 1.0);
      in.active = every_nth_inactive(32, 4);
      check(router, in, true, 1.0);
      in.sequences = {0, 32, 0};
      check(router, in, true, 1.0);
      Inputs one = exact_inputs(1, e, h, rng, 3.0f);
      one.sequences = {1};
      check(router, one, true, 1.0);
      Inputs none = exact_inputs(0, e, h, rng);
      check(router, none, true, 1.0);
      none.sequences = {0, 0};
      check(router, none, true, 1.0);
    }
  }
  // The drops really happen (the test is not vacuous).
  RouterConfig c = softmax_config(e, 1, false);
  c.kind = RouterKind::kSwitch;
  c.expert_capacity = 2;
  const Router router = make_router(c, one_hot_gate(e, h), h);
  Inputs in = exact_inputs(32, e, h, rng, 3.0f);
  in.sequences = {10, 22};
  const Routing dev = device_route(cuda::DeviceRouter(router), in);
  int64_t dropped = 0, passed = 0;
  for (int64_t d : dev.expert_dropped) dropped += d;
  for (uint8_t p : dev.passthrough) passed += p;
  REQUIRE(dropped > 4);
  REQUIRE(passed == dropped);
}

TEST_CASE("cuda router: switch sequence lengths are checked like the host's", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  RouterConfig c = softmax_config(4, 1, false);
  c.kind = RouterKind::kSwitch;
  c.expert_capacity = 2;
  const cuda::DeviceRouter router(make_router(c, one_hot_gate(4, 4), 4));
  cuda::DeviceRouting r = router.make_routing(8);
  cuda::DeviceBuffer x(8 * 4 * sizeof(float));
  cuda::DeviceRouteOptions o;
  const std::vector<int64_t> short_by_one = {3, 4}, negative = {10, -2};
  o.sequence_lengths = short_by_one;
  CHECK_THROWS_WITH(router.route(x.as<float>(), 8, 4, r, o),
                    Catch::Contains("sequence lengths sum to 7, not 8 tokens"));
  o.sequence_lengths = negative;
  CHECK_THROWS_WITH(router.route(x.as<float>(), 8, 4, r, o),
                    Catch::Contains("negative sequence length -2"));
}

TEST_CASE("cuda router: capacity_factor drops slots in token order", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(16);
  const int64_t e = 8, h = 9;
  std::vector<RouterConfig> configs = {softmax_config(e, 2, false), softmax_config(e, 3, true)};
  RouterConfig mixtral = softmax_config(e, 2, false);
  mixtral.kind = RouterKind::kMixtral;
  configs.push_back(mixtral);
  RouterConfig sw = softmax_config(e, 1, false);  // switch without expert_capacity
  sw.kind = RouterKind::kSwitch;
  configs.push_back(sw);
  RouterConfig v2 = softmax_config(e, 2, false);
  v2.kind = RouterKind::kDeepSeekV2;
  v2.topk_method = TopkMethod::kGroupLimitedGreedy;
  v2.n_group = 4;
  v2.topk_group = 2;
  configs.push_back(v2);
  for (RouterConfig c : configs) {
    for (double factor : {0.3, 1.0, 1.25, 1e30}) {
      c.capacity_factor = factor;
      const Router router = make_router(c, one_hot_gate(e, h), h);
      for (int64_t t_count : {1, 50, 333}) {
        INFO(to_string(c.kind) << " factor " << factor << " T " << t_count);
        Inputs in = exact_inputs(t_count, e, h, rng, 2.0f);
        check(router, in, true, 1.0);
        in.active = every_nth_inactive(t_count, 3);
        check(router, in, true, 1.0);
      }
    }
  }
  // Drops happen at factor 0.3 with hot experts.
  RouterConfig c = softmax_config(e, 2, false);
  c.capacity_factor = 0.3;
  const Router router = make_router(c, one_hot_gate(e, h), h);
  const Routing dev = device_route(cuda::DeviceRouter(router), exact_inputs(100, e, h, rng, 2.0f));
  int64_t dropped = 0;
  for (int64_t d : dev.expert_dropped) dropped += d;
  REQUIRE(dropped > 0);
}

namespace {

// Expert choice: expert e's tokens are decided when the boundary of its top C (in log
// probability, error at most 2 * bound per side plus the rounding of exp) is clear of the others,
// or an exact tie of identical rows (then resolved by token index on both sides).
void check_expert_choice(const Router& router, const Inputs& in, bool exact_logits,
                         double min_decided) {
  const RouterConfig& c = router.config();
  const int64_t e = c.num_experts, t_count = in.tokens;
  const cuda::DeviceRouter dr(router);
  const Routing ref = host_route(router, in);
  const Routing dev = device_route(dr, in);
  REQUIRE(dev.tokens == ref.tokens);
  REQUIRE(dev.slots == e);
  const Shadow s = shadow(router, in, exact_logits);
  const double rel = weight_tolerance(c, s);
  int64_t n_active = 0;
  for (int64_t t = 0; t < t_count; ++t) n_active += in.active.empty() || in.active[t] ? 1 : 0;
  const int64_t cap = std::min(
      n_active, c.expert_capacity > 0
                    ? c.expert_capacity
                    : static_cast<int64_t>(std::ceil(double(n_active) * c.top_k / double(e))));
  const double tol = 4 * s.bound_max + 2 * softmax_slack(e);
  int64_t decided = 0;
  bool all = true;
  for (int64_t x_e = 0; x_e < e; ++x_e) {
    std::vector<Item> items;
    for (int64_t t = 0; t < t_count; ++t) {
      if (!(in.active.empty() || in.active[t])) continue;
      const double* lg = &s.logits[t * e];
      double m = -INFINITY, sum = 0;
      for (int64_t i = 0; i < e; ++i) m = std::max(m, lg[i]);
      for (int64_t i = 0; i < e; ++i) sum += std::exp(lg[i] - m);
      items.push_back({lg[x_e] - m - std::log(sum), s.row_key[t], t});
    }
    if (!set_decided(items, cap, tol)) {
      all = false;
      continue;
    }
    ++decided;
    INFO("expert " << x_e << " capacity " << cap);
    int64_t taken = 0;
    for (int64_t t = 0; t < t_count; ++t) {
      INFO("token " << t);
      REQUIRE(dev.id(t, x_e) == ref.id(t, x_e));
      REQUIRE(dev.kept[t * e + x_e] == ref.kept[t * e + x_e]);
      REQUIRE(weight_close(dev.weight(t, x_e), ref.weight(t, x_e), rel));
      taken += dev.kept[t * e + x_e];
    }
    REQUIRE(taken == cap);
  }
  INFO(decided << " of " << e << " experts decided");
  REQUIRE(double(decided) >= min_decided * double(e));
  for (int64_t t = 0; t < t_count; ++t) REQUIRE(dev.passthrough[t] == 0);
  if (all) {
    REQUIRE(dev.expert_load == ref.expert_load);
    REQUIRE(dev.expert_dropped == ref.expert_dropped);
  }
}

}  // namespace

TEST_CASE("cuda router: expert choice, with and without expert_capacity", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(17);
  const int64_t e = 8, h = 11;
  for (int64_t capacity : {0, 1, 3, 1000}) {
    for (int64_t k : {1, 2, 5}) {
      RouterConfig c = softmax_config(e, k, false);
      c.kind = RouterKind::kExpertChoice;
      c.expert_capacity = capacity;
      const Router router = make_router(c, one_hot_gate(e, h), h);
      for (int64_t t_count : {0, 1, 13, 64, 700}) {
        for (bool mask : {false, true}) {
          INFO("capacity " << capacity << " top_k " << k << " T " << t_count << " mask " << mask);
          Inputs in = exact_inputs(t_count, e, h, rng);
          // Duplicate rows tie exactly in every column: the lower token index must win.
          for (int64_t t = 1; t < t_count; t += 4) {
            std::copy_n(&in.x[(t - 1) * in.ldx], in.ldx, &in.x[t * in.ldx]);
          }
          if (mask) in.active = every_nth_inactive(t_count, 5);
          check_expert_choice(router, in, true, t_count > 200 ? 0.5 : 0.75);
        }
      }
    }
  }
  RouterConfig c = softmax_config(32, 2, false);
  c.kind = RouterKind::kExpertChoice;
  const Router router = make_router(c, random_gate(32, 129, rng), 129);
  check_expert_choice(router, random_inputs(300, 129, rng), false, 0.75);
}

TEST_CASE("cuda router: task routing, one id or per-token ids, inactive tokens", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  RouterConfig c;
  c.kind = RouterKind::kTask;
  c.num_experts = 6;
  c.top_k = 2;
  c.tasks = {{{0, 3}, {0.75f, 0.25f}}, {{5, 1}, {0.5f, 0.5f}}, {{2, 4}, {1.0f, -0.125f}}};
  const Router router(c, {}, 0);
  const cuda::DeviceRouter dr(router);
  for (int64_t t_count : {0, 1, 29}) {
    for (bool mask : {false, true}) {
      for (bool capacity : {false, true}) {
        RouterConfig cc = c;
        cc.capacity_factor = capacity ? 0.5 : 0.0;
        const Router r(cc, {}, 0);
        Inputs in;
        in.tokens = t_count;
        if (mask) in.active = every_nth_inactive(t_count, 3);
        in.task_id = 2;
        INFO("T " << t_count << " mask " << mask << " capacity " << capacity);
        check(r, in, true);
        for (int64_t t = 0; t < t_count; ++t) in.task_ids.push_back(static_cast<int32_t>(t % 3));
        check(r, in, true);
      }
    }
  }
  // A bad per-token id: that token gets no slots, download() reports the first one.
  Inputs in;
  in.tokens = 6;
  in.task_ids = {0, 1, 9, 2, -1, 1};
  cuda::DeviceRouting r = dr.make_routing(6);
  poison(r);
  cuda::DeviceBuffer ids(6 * sizeof(int32_t));
  ids.upload(std::span<const int32_t>(in.task_ids));
  cuda::DeviceRouteOptions o;
  o.task_ids = ids.as<int32_t>();
  dr.route(nullptr, 6, 0, r, o);
  Routing out;
  CHECK_THROWS_WITH(cuda::download(r, out),
                    Catch::Contains("task id 9 of token 2 is not one of the 3 tasks"));
  REQUIRE(out.tokens == 6);
  for (int64_t t : {2, 4}) {
    REQUIRE(out.id(t, 0) == -1);
    REQUIRE(out.kept[t * 2] == 0);
  }
  REQUIRE(out.id(3, 1) == 4);
  // The flag is cleared by the next route.
  in.task_ids = {0, 1, 2, 2, 1, 1};
  ids.upload(std::span<const int32_t>(in.task_ids));
  dr.route(nullptr, 6, 0, r, o);
  REQUIRE_NOTHROW(cuda::download(r, out));
  // One bad id for all tokens is checked on the host.
  cuda::DeviceRouteOptions one;
  one.task_id = 3;
  CHECK_THROWS_WITH(dr.route(nullptr, 6, 0, r, one),
                    Catch::Contains("task id 3 of token 0 is not one of the 3 tasks"));
}

TEST_CASE("cuda router: routing reuse, T = 0 and argument checks", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(18);
  const int64_t e = 8, h = 10;
  const Router router = make_router(softmax_config(e, 2, true), one_hot_gate(e, h), h);
  const cuda::DeviceRouter dr(router);
  REQUIRE(dr.num_experts() == e);
  REQUIRE(dr.hidden() == h);
  REQUIRE(dr.slots_per_token() == 2);
  cuda::DeviceRouting r = dr.make_routing(50);
  Routing out;
  cuda::download(r, out);  // nothing routed yet: an empty routing
  REQUIRE(out.tokens == 0);
  REQUIRE(out.expert_load == std::vector<int64_t>(e, 0));
  REQUIRE(r.max_tokens == 50);
  REQUIRE(r.slots == 2);
  REQUIRE(r.num_experts == e);
  poison(r);
  Inputs in = exact_inputs(50, e, h, rng);
  cuda::DeviceBuffer x(in.x.size() * sizeof(float));
  x.upload(std::span<const float>(in.x));
  for (int64_t t_count : {50, 0, 7, 1}) {  // shrinking reuses the same buffers
    Inputs sub = in;
    sub.tokens = t_count;
    dr.route(x.as<float>(), t_count, in.ldx, r);
    cuda::download(r, out);
    INFO("T " << t_count);
    require_same(host_route(router, sub), out, weight_tolerance(router.config(), Shadow{}));
  }
  CHECK_THROWS_WITH(dr.route(x.as<float>(), 51, in.ldx, r),
                    Catch::Contains("51 tokens for a routing of at most 50"));
  CHECK_THROWS_WITH(dr.route(x.as<float>(), 5, h - 1, r),
                    Catch::Contains("row stride 9 is smaller than the hidden size 10"));
  CHECK_THROWS_WITH(dr.route(nullptr, 5, h, r), Catch::Contains("null input"));
  RouterConfig other = softmax_config(e, 3, true);
  cuda::DeviceRouting wrong =
      cuda::DeviceRouter(make_router(other, one_hot_gate(e, h), h)).make_routing(50);
  CHECK_THROWS_WITH(dr.route(x.as<float>(), 5, h, wrong), Catch::Contains("3 slots"));
  // A grouped router needs the group scratch a plain one lacks.
  RouterConfig grouped = softmax_config(e, 2, false);
  grouped.kind = RouterKind::kDeepSeekV3;
  grouped.n_group = 4;
  grouped.topk_group = 2;
  const cuda::DeviceRouter gr(make_router(grouped, one_hot_gate(e, h), h));
  CHECK_THROWS_WITH(gr.route(x.as<float>(), 5, h, r), Catch::Contains("scratch"));
}

TEST_CASE("cuda router: more experts than a warp holds (the serial selection)", "[cuda]") {
  MOQE_REQUIRE_DEVICE();
  std::mt19937 rng(19);
  const int64_t e = 2112, h = 2112;  // > 64 experts per lane
  RouterConfig soft = softmax_config(e, 3, true);
  RouterConfig v2 = softmax_config(e, 4, false);
  v2.kind = RouterKind::kDeepSeekV2;
  v2.topk_method = TopkMethod::kGroupLimitedGreedy;
  v2.n_group = 8;
  v2.topk_group = 3;
  RouterConfig v3 = v2;
  v3.kind = RouterKind::kDeepSeekV3;
  v3.norm_topk_prob = true;
  for (const RouterConfig& c : {soft, v2, v3}) {
    INFO(to_string(c.kind));
    Inputs in = exact_inputs(9, e, h, rng);
    in.active = every_nth_inactive(9, 4);
    check(make_router(c, one_hot_gate(e, h), h), in, true,
          c.kind == RouterKind::kDeepSeekV3 ? 0.75 : 1.0);
  }
  RouterConfig ec = softmax_config(e, 2, false);
  ec.kind = RouterKind::kExpertChoice;
  ec.expert_capacity = 2;
  check_expert_choice(make_router(ec, one_hot_gate(e, h), h), exact_inputs(6, e, h, rng), true,
                      0.75);
}
