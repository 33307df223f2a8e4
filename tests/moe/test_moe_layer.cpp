// MoELayer::run against a per-token reference written here in double precision: route each
// token, run each chosen expert on it, sum weight * expert(x), add the shared experts, mix in the
// PR-MoE residual MLP; plus bit-exactness (quantized == dequantized, thread counts, threads
// running one layer at once), inactive tokens, task extraction and workspace limits.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numbers>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moqe/core/cpu.hpp"
#include "moqe/core/error.hpp"
#include "moqe/moe/moe_layer.hpp"
#include "moqe/quant/quantized_matrix.hpp"
#include "test_util.hpp"

using namespace moqe;

namespace {

// Bit-for-bit equality (memcmp, but safe for empty vectors).
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// ---------------------------------------------------------------------------------------------
// Weights and the double-precision reference

double act_ref(Activation a, double x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1.0 + std::exp(-x));
    case Activation::kGeluTanh:
      return 0.5 * x *
             (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
    case Activation::kGelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::kRelu:
      return x > 0 ? x : 0.0;
  }
  return x;
}

double dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

std::vector<float> normal(size_t n, std::mt19937& rng, float sigma) {
  std::normal_distribution<float> g(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = g(rng);
  return v;
}

// An expert's weights in fp32: gate [I, H] (glu only), up [I, H], down [H, I].
struct MlpW {
  MlpKind kind = MlpKind::kGlu;
  Activation act = Activation::kSilu;
  int64_t h = 0, i = 0;
  std::vector<float> gate, up, down;
};

MlpW random_mlp(MlpKind kind, Activation act, int64_t h, int64_t i, std::mt19937& rng) {
  MlpW m{kind, act, h, i, {}, {}, {}};
  if (kind == MlpKind::kGlu) m.gate = normal(size_t(i * h), rng, 0.1f);
  m.up = normal(size_t(i * h), rng, 0.1f);
  m.down = normal(size_t(h * i), rng, 0.1f);
  return m;
}

std::shared_ptr<const ExpertMLP> build_mlp(const MlpW& m, bool fuse = true) {
  auto up = QuantizedLinear::from_f32(m.up, m.i, m.h);
  auto down = QuantizedLinear::from_f32(m.down, m.h, m.i);
  if (m.kind == MlpKind::kMlp) {
    return std::make_shared<ExpertMLP>(ExpertMLP::mlp(std::move(up), std::move(down), m.act));
  }
  return std::make_shared<ExpertMLP>(ExpertMLP::glu(QuantizedLinear::from_f32(m.gate, m.i, m.h),
                                                    std::move(up), std::move(down), m.act, fuse));
}

// expert(x) in double.
std::vector<double> ref_mlp(const MlpW& m, const float* x) {
  std::vector<double> a(static_cast<size_t>(m.i));
  for (int64_t r = 0; r < m.i; ++r) {
    const double u = dot(&m.up[r * m.h], x, m.h);
    a[r] = m.kind == MlpKind::kGlu ? act_ref(m.act, dot(&m.gate[r * m.h], x, m.h)) * u
                                   : act_ref(m.act, u);
  }
  std::vector<double> y(static_cast<size_t>(m.h), 0.0);
  for (int64_t c = 0; c < m.h; ++c) {
    for (int64_t r = 0; r < m.i; ++r) y[c] += double(m.down[c * m.i + r]) * a[r];
  }
  return y;
}

struct Spec {
  std::string name;
  RouterConfig rc;
  int64_t h = 64, i = 96;
  int64_t shared_i = 0;  // one shared expert of this intermediate size (0: none)
  bool shared_gated = false;
  bool residual = false;     // PR-MoE
  std::vector<int64_t> seq;  // switch: sequence lengths (summing to the token count)
  int64_t tasks = 0;         // task router: tasks, one per token at random
};

struct Model {
  Spec spec;
  std::vector<float> wg;  // [E, H]
  std::vector<MlpW> experts;
  std::optional<MlpW> shared;
  std::vector<float> shared_gate;  // [H] or empty
  std::optional<MlpW> residual;
  std::vector<float> wc;  // [2, H]
  MoELayer layer;
};

Model make_model(const Spec& s, MlpKind kind, Activation act, uint32_t seed) {
  std::mt19937 rng(seed);
  Model m;
  m.spec = s;
  const int64_t e = s.rc.num_experts;
  RouterConfig rc = s.rc;
  if (rc.kind == RouterKind::kDeepSeekV3) rc.correction_bias = normal(size_t(e), rng, 0.1f);
  if (rc.kind == RouterKind::kTask) {
    std::uniform_real_distribution<float> u(0.1f, 1.0f);
    for (int64_t t = 0; t < s.tasks; ++t) {
      std::vector<int32_t> ids(static_cast<size_t>(e));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      TaskRoute r;
      r.experts.assign(ids.begin(), ids.begin() + rc.top_k);
      for (int64_t j = 0; j < rc.top_k; ++j) r.weights.push_back(u(rng));
      rc.tasks.push_back(r);
    }
  } else {
    m.wg = normal(size_t(e * s.h), rng, 0.1f);
  }
  m.spec.rc = rc;
  std::vector<std::shared_ptr<const ExpertMLP>> experts;
  for (int64_t x = 0; x < e; ++x) {
    m.experts.push_back(random_mlp(kind, act, s.h, s.i, rng));
    experts.push_back(build_mlp(m.experts.back()));
  }
  std::vector<SharedExpert> shared;
  if (s.shared_i > 0) {
    m.shared = random_mlp(kind, act, s.h, s.shared_i, rng);
    if (s.shared_gated) m.shared_gate = normal(size_t(s.h), rng, 0.1f);
    shared.push_back({build_mlp(*m.shared), m.shared_gate});
  }
  std::optional<ResidualMLP> residual;
  if (s.residual) {
    m.residual = random_mlp(kind, act, s.h, s.i, rng);
    m.wc = normal(size_t(2 * s.h), rng, 0.1f);
    residual = ResidualMLP{build_mlp(*m.residual), m.wc};
  }
  m.layer = MoELayer(Router(rc, m.wg, s.h), std::move(experts), std::move(shared), residual);
  return m;
}

struct Inputs {
  int64_t tokens = 0;
  std::vector<float> x;  // [T, H]
  std::vector<uint8_t> active;
  std::vector<int64_t> seq;
  int32_t task_id = 0;
  std::vector<int32_t> task_ids;

  MoeRunOptions options(int threads = 0) const {
    MoeRunOptions o;
    o.num_threads = threads;
    o.active = active;
    o.sequence_lengths = seq;
    o.task_id = task_id;
    o.task_ids = task_ids;
    return o;
  }
};

Inputs make_inputs(const Model& m, int64_t tokens, uint32_t seed, double p_inactive = 0.0) {
  std::mt19937 rng(seed);
  Inputs in;
  in.tokens = tokens;
  in.x = normal(size_t(tokens * m.spec.h), rng, 1.0f);
  if (p_inactive > 0) {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    for (int64_t t = 0; t < tokens; ++t) in.active.push_back(u(rng) < p_inactive ? 0 : 1);
  }
  if (!m.spec.seq.empty() &&
      tokens == std::accumulate(m.spec.seq.begin(), m.spec.seq.end(), int64_t{0})) {
    in.seq = m.spec.seq;
  }
  if (m.spec.tasks > 0) {
    std::uniform_int_distribution<int32_t> u(0, int32_t(m.spec.tasks - 1));
    for (int64_t t = 0; t < tokens; ++t) in.task_ids.push_back(u(rng));
  }
  return in;
}

// Scores closer than this at a selection boundary may rank differently in fp32: the fp32 logits
// are within H * eps * sum |x w| (about 3e-5 here) of the exact ones, softmax and sigmoid change
// by no more than that, and a group score sums two of them.
constexpr double kMargin = 2e-4;

struct RefRoute {
  int64_t slots = 0;
  std::vector<int32_t> ids;
  std::vector<double> w;
  std::vector<uint8_t> kept, pass;
  bool near_tie = false;
};

// Indices by falling value, ties to the lower index.
std::vector<int> ranked(const std::vector<double>& v) {
  std::vector<int> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
  return order;
}

bool tie_at(const std::vector<double>& v, const std::vector<int>& order, size_t k) {
  if (k == 0 || k >= order.size()) return false;
  const double a = v[order[k - 1]], b = v[order[k]];
  if (std::isinf(a) || std::isinf(b)) return false;
  return a - b < kMargin;
}

std::vector<double> softmax(std::vector<double> v) {
  const double m = *std::max_element(v.begin(), v.end());
  double s = 0;
  for (auto& x : v) s += (x = std::exp(x - m));
  for (auto& x : v) x /= s;
  return v;
}

RefRoute ref_route(const Model& m, const Inputs& in) {
  const RouterConfig& c = m.spec.rc;
  const int64_t T = in.tokens, E = c.num_experts, K = c.top_k, H = m.spec.h;
  const bool ec = c.kind == RouterKind::kExpertChoice;
  RefRoute r;
  r.slots = ec ? E : K;
  r.ids.assign(size_t(T * r.slots), -1);
  r.w.assign(r.ids.size(), 0.0);
  r.kept.assign(r.ids.size(), 0);
  r.pass.assign(size_t(T), 0);
  auto active = [&](int64_t t) { return in.active.empty() || in.active[t]; };
  int64_t n_active = 0;
  for (int64_t t = 0; t < T; ++t) n_active += active(t) ? 1 : 0;
  std::vector<std::vector<double>> logits(static_cast<size_t>(T));
  if (c.kind != RouterKind::kTask) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        logits[t].push_back(dot(&m.wg[e * H], &in.x[t * H], H));
      }
    }
  }
  auto take = [&](int64_t t, const std::vector<int>& order, const std::vector<double>& w) {
    for (int64_t j = 0; j < K; ++j) {
      r.ids[t * K + j] = order[j];
      r.w[t * K + j] = w[order[j]];
      r.kept[t * K + j] = 1;
    }
  };
  if (ec) {
    std::vector<std::vector<double>> p(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) p[t] = softmax(logits[t]);
    const int64_t cap =
        std::min(n_active, c.expert_capacity > 0 ? c.expert_capacity : (n_active * K + E - 1) / E);
    for (int64_t e = 0; e < E; ++e) {
      std::vector<double> col(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t) col[t] = active(t) ? p[t][e] : -INFINITY;
      const std::vector<int> order = ranked(col);
      r.near_tie = r.near_tie || tie_at(col, order, size_t(cap));
      for (int64_t j = 0; j < cap; ++j) {
        const int64_t s = order[j] * E + e;
        r.ids[s] = int32_t(e);
        r.w[s] = p[order[j]][e];
        r.kept[s] = 1;
      }
    }
    return r;
  }
  for (int64_t t = 0; t < T; ++t) {
    if (!active(t)) continue;
    switch (c.kind) {
      case RouterKind::kSoftmaxTopK:
      case RouterKind::kMixtral:
      case RouterKind::kSwitch: {
        const std::vector<double> p = softmax(logits[t]);
        const std::vector<int> order = ranked(p);
        r.near_tie = r.near_tie || tie_at(p, order, size_t(K));
        std::vector<double> w = p;
        if (c.kind == RouterKind::kMixtral ||
            (c.kind == RouterKind::kSoftmaxTopK && c.norm_topk_prob)) {
          double s = 0;
          for (int64_t j = 0; j < K; ++j) s += p[order[j]];
          for (auto& x : w) x /= s;
        }
        take(t, order, w);
        break;
      }
      case RouterKind::kDeepSeekV2: {
        const std::vector<double> p = softmax(logits[t]);
        std::vector<double> choice = p;
        if (c.topk_method == TopkMethod::kGroupLimitedGreedy) {
          const int64_t gsize = E / c.n_group;
          std::vector<double> gs(static_cast<size_t>(c.n_group));
          for (int64_t g = 0; g < c.n_group; ++g) {
            gs[g] = *std::max_element(p.begin() + g * gsize, p.begin() + (g + 1) * gsize);
          }
          const std::vector<int> gorder = ranked(gs);
          r.near_tie = r.near_tie || tie_at(gs, gorder, size_t(c.topk_group));
          std::vector<uint8_t> keep(static_cast<size_t>(c.n_group), 0);
          for (int64_t g = 0; g < c.topk_group; ++g) keep[gorder[g]] = 1;
          for (int64_t e = 0; e < E; ++e) {
            if (!keep[e / gsize]) choice[e] = 0.0;
          }
        }
        const std::vector<int> order = ranked(choice);
        r.near_tie = r.near_tie || tie_at(choice, order, size_t(K));
        std::vector<double> w = p;
        for (auto& x : w) x *= c.routed_scaling_factor;
        take(t, order, w);
        break;
      }
      case RouterKind::kDeepSeekV3: {
        std::vector<double> s(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
        for (int64_t e = 0; e < E; ++e) {
          s[e] = 1.0 / (1.0 + std::exp(-logits[t][e]));
          choice[e] = s[e] + (c.correction_bias.empty() ? 0.0 : c.correction_bias[e]);
        }
        const int64_t gsize = E / c.n_group;
        std::vector<double> gs(static_cast<size_t>(c.n_group));
        for (int64_t g = 0; g < c.n_group; ++g) {
          std::vector<double> grp(choice.begin() + g * gsize, choice.begin() + (g + 1) * gsize);
          std::sort(grp.begin(), grp.end(), std::greater<>());
          gs[g] = grp[0] + grp[1];
        }
        const std::vector<int> gorder = ranked(gs);
        r.near_tie = r.near_tie || tie_at(gs, gorder, size_t(c.topk_group));
        std::vector<uint8_t> keep(static_cast<size_t>(c.n_group), 0);
        for (int64_t g = 0; g < c.topk_group; ++g) keep[gorder[g]] = 1;
        for (int64_t e = 0; e < E; ++e) {
          if (!keep[e / gsize]) choice[e] = -INFINITY;
        }
        const std::vector<int> order = ranked(choice);
        r.near_tie = r.near_tie || tie_at(choice, order, size_t(K));
        double sum = 0;
        for (int64_t j = 0; j < K; ++j) sum += s[order[j]];
        std::vector<double> w = s;
        for (auto& x : w) {
          if (c.norm_topk_prob) x /= sum + 1e-20;
          x *= c.routed_scaling_factor;
        }
        take(t, order, w);
        break;
      }
      case RouterKind::kTask: {
        const int32_t id = in.task_ids.empty() ? in.task_id : in.task_ids[t];
        const TaskRoute& tr = c.tasks[id];
        for (int64_t j = 0; j < K; ++j) {
          r.ids[t * K + j] = tr.experts[j];
          r.w[t * K + j] = tr.weights[j];
          r.kept[t * K + j] = 1;
        }
        break;
      }
      default:
        FAIL("unhandled router kind");
    }
  }
  // Capacity, in token order.
  if (c.kind == RouterKind::kSwitch && c.expert_capacity > 0) {
    std::vector<int64_t> seq = in.seq;
    if (seq.empty()) seq.push_back(T);
    int64_t t = 0;
    for (int64_t len : seq) {
      std::vector<int64_t> load(static_cast<size_t>(E), 0);
      for (int64_t end = t + len; t < end; ++t) {
        if (!active(t)) continue;
        if (++load[r.ids[t]] > c.expert_capacity) {
          r.kept[t] = 0;
          r.pass[t] = c.switch_passthrough ? 1 : 0;
        }
      }
    }
  } else if (c.capacity_factor > 0) {
    const auto cap = static_cast<int64_t>(
        std::ceil(c.capacity_factor * double(n_active) * double(K) / double(E)));
    std::vector<int64_t> load(static_cast<size_t>(E), 0);
    for (size_t s = 0; s < r.ids.size(); ++s) {
      if (r.kept[s] && ++load[r.ids[s]] > cap) r.kept[s] = 0;
    }
  }
  return r;
}

// The layer output in double, given the routing.
std::vector<double> ref_layer(const Model& m, const Inputs& in, const RefRoute& r) {
  const int64_t T = in.tokens, H = m.spec.h;
  std::vector<double> y(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    if (!in.active.empty() && !in.active[t]) continue;  // inactive: 0, no shared experts
    const float* x = &in.x[t * H];
    double* out = &y[t * H];
    if (r.pass[t]) {  // Switch over capacity: p_max * x
      for (int64_t c = 0; c < H; ++c) out[c] = r.w[t * r.slots] * x[c];
    } else {
      for (int64_t j = 0; j < r.slots; ++j) {
        const int64_t s = t * r.slots + j;
        if (!r.kept[s]) continue;  // dropped for capacity: contributes 0
        const std::vector<double> e = ref_mlp(m.experts[r.ids[s]], x);
        for (int64_t c = 0; c < H; ++c) out[c] += r.w[s] * e[c];
      }
    }
    if (m.shared) {
      const double g =
          m.shared_gate.empty() ? 1.0 : 1.0 / (1.0 + std::exp(-dot(m.shared_gate.data(), x, H)));
      const std::vector<double> sh = ref_mlp(*m.shared, x);
      for (int64_t c = 0; c < H; ++c) out[c] += g * sh[c];
    }
    if (m.residual) {
      const double l0 = dot(m.wc.data(), x, H), l1 = dot(m.wc.data() + H, x, H);
      const double c0 = 1.0 / (1.0 + std::exp(l1 - l0)), c1 = 1.0 - c0;
      const std::vector<double> res = ref_mlp(*m.residual, x);
      for (int64_t c = 0; c < H; ++c) out[c] = c0 * out[c] + c1 * res[c];
    }
  }
  return y;
}

std::vector<float> run_layer(const MoELayer& layer, const Inputs& in, int threads = 0,
                             MoeWorkspace* ws_out = nullptr) {
  const int64_t H = layer.hidden();
  MoeWorkspace ws = layer.make_workspace(in.tokens);
  std::vector<float> y(static_cast<size_t>(in.tokens * H), std::nanf(""));
  layer.run(MatrixView<const float>(in.x.data(), in.tokens, H),
            MatrixView<float>(y.data(), in.tokens, H), ws, in.options(threads));
  if (ws_out) *ws_out = std::move(ws);
  return y;
}

double rel_error(const std::vector<float>& y, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// Runs the layer and checks routing and output against the reference.
void check_against_reference(const Model& m, const Inputs& in, const RefRoute& ref) {
  MoeWorkspace ws;
  const std::vector<float> y = run_layer(m.layer, in, 0, &ws);
  const Routing& r = ws.routing;
  REQUIRE(r.tokens == in.tokens);
  REQUIRE(r.slots == ref.slots);
  REQUIRE(r.ids == ref.ids);
  REQUIRE(r.kept == ref.kept);
  REQUIRE(r.passthrough == ref.pass);
  for (size_t s = 0; s < ref.w.size(); ++s) {
    // The weights are products of a few fp32 roundings of values the margin already bounds.
    REQUIRE(std::abs(r.weights[s] - ref.w[s]) <= 1e-5 * std::max(1.0, std::abs(ref.w[s])));
  }
  std::vector<int64_t> load(static_cast<size_t>(m.spec.rc.num_experts), 0);
  for (size_t s = 0; s < ref.ids.size(); ++s) {
    if (ref.kept[s]) load[ref.ids[s]]++;
  }
  CHECK(r.expert_load == load);
  const std::vector<double> want = ref_layer(m, in, ref);
  // Rows that must be exactly 0 (inactive tokens, tokens with every slot dropped) are.
  for (int64_t t = 0; t < in.tokens; ++t) {
    bool zero = true;
    for (int64_t c = 0; c < m.spec.h; ++c) zero = zero && want[t * m.spec.h + c] == 0.0;
    if (zero) {
      for (int64_t c = 0; c < m.spec.h; ++c) REQUIRE(y[t * m.spec.h + c] == 0.0f);
    }
  }
  const double err = rel_error(y, want);
  INFO("relative error " << err);
  CHECK(err <= 1e-5);
}

// Inputs whose routing has no near-tie at any selection boundary (so fp32 and the double
// reference must choose the same experts), trying seeds from `seed` on.
std::pair<Inputs, RefRoute> inputs_without_ties(const Model& m, int64_t tokens, uint32_t seed,
                                                double p_inactive = 0.0) {
  for (uint32_t s = seed; s < seed + 200; ++s) {
    Inputs in = make_inputs(m, tokens, s, p_inactive);
    RefRoute r = ref_route(m, in);
    if (!r.near_tie) return {std::move(in), std::move(r)};
  }
  FAIL("no seed without near-ties");
  return {};
}

RouterConfig rc(RouterKind kind, int64_t e, int64_t k) {
  RouterConfig c;
  c.kind = kind;
  c.num_experts = e;
  c.top_k = k;
  return c;
}

Spec spec(std::string name, const RouterConfig& c, int64_t h, int64_t i) {
  Spec s;
  s.name = std::move(name);
  s.rc = c;
  s.h = h;
  s.i = i;
  return s;
}

std::vector<Spec> all_specs() {
  std::vector<Spec> specs;
  {
    Spec s = spec("softmax_topk", rc(RouterKind::kSoftmaxTopK, 8, 2), 64, 96);
    specs.push_back(s);
  }
  {  // Qwen2-MoE: renormalized, a gated shared expert
    Spec s = spec("qwen2_moe", rc(RouterKind::kSoftmaxTopK, 12, 4), 48, 64);
    s.rc.norm_topk_prob = true;
    s.shared_i = 128;
    s.shared_gated = true;
    specs.push_back(s);
  }
  {
    Spec s = spec("softmax_topk capacity_factor 0.75", rc(RouterKind::kSoftmaxTopK, 6, 2), 56, 80);
    s.rc.capacity_factor = 0.75;
    specs.push_back(s);
  }
  {  // k = E, with a PR-MoE residual MLP
    Spec s = spec("softmax_topk k = E, PR-MoE", rc(RouterKind::kSoftmaxTopK, 4, 4), 64, 72);
    s.rc.norm_topk_prob = true;
    s.residual = true;
    specs.push_back(s);
  }
  specs.push_back(spec("mixtral", rc(RouterKind::kMixtral, 8, 2), 64, 160));
  {
    Spec s = spec("deepseek_v2 greedy", rc(RouterKind::kDeepSeekV2, 10, 3), 72, 64);
    s.rc.routed_scaling_factor = 1.5f;
    s.shared_i = 128;
    specs.push_back(s);
  }
  {
    Spec s = spec("deepseek_v2 group_limited_greedy", rc(RouterKind::kDeepSeekV2, 16, 4), 64, 64);
    s.rc.topk_method = TopkMethod::kGroupLimitedGreedy;
    s.rc.n_group = 4;
    s.rc.topk_group = 2;
    s.rc.routed_scaling_factor = 2.0f;
    s.shared_i = 96;
    specs.push_back(s);
  }
  {
    Spec s = spec("deepseek_v3 norm", rc(RouterKind::kDeepSeekV3, 16, 4), 96, 64);
    s.rc.n_group = 4;
    s.rc.topk_group = 2;
    s.rc.norm_topk_prob = true;
    s.rc.routed_scaling_factor = 2.5f;
    s.shared_i = 128;
    specs.push_back(s);
  }
  {
    Spec s = spec("deepseek_v3", rc(RouterKind::kDeepSeekV3, 8, 2), 48, 96);
    s.rc.n_group = 2;
    s.rc.topk_group = 1;
    specs.push_back(s);
  }
  {
    Spec s = spec("switch capacity 3, two sequences", rc(RouterKind::kSwitch, 8, 1), 64, 128);
    s.rc.expert_capacity = 3;
    s.seq = {10, 14};
    specs.push_back(s);
  }
  {
    Spec s = spec("switch capacity 4, dropped give 0", rc(RouterKind::kSwitch, 4, 1), 48, 64);
    s.rc.expert_capacity = 4;
    s.rc.switch_passthrough = false;
    specs.push_back(s);
  }
  {
    Spec s = spec("task, PR-MoE", rc(RouterKind::kTask, 6, 2), 64, 96);
    s.tasks = 3;
    s.residual = true;
    specs.push_back(s);
  }
  specs.push_back(spec("expert_choice", rc(RouterKind::kExpertChoice, 8, 2), 64, 64));
  {
    Spec s = spec("expert_choice capacity 5", rc(RouterKind::kExpertChoice, 5, 1), 80, 72);
    s.rc.expert_capacity = 5;
    specs.push_back(s);
  }
  return specs;
}

// The CPU kernels this build and machine can run: the reference, and the best SIMD level if any.
std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> v = {CpuIsa::kReference};
  if (best_cpu_isa() != CpuIsa::kReference) v.push_back(best_cpu_isa());
  return v;
}

constexpr MlpKind kMlpKinds[] = {MlpKind::kGlu, MlpKind::kMlp};
constexpr Activation kActivations[] = {Activation::kSilu, Activation::kGeluTanh, Activation::kGelu,
                                       Activation::kRelu};

}  // namespace

TEST_CASE("MoELayer matches the per-token reference for every router, MLP and activation",
          "[moe][layer]") {
  const CpuIsa isa = GENERATE(from_range(isas()));
  INFO(to_string(isa));
  const test::ScopedCpuIsa cap(isa);
  uint32_t seed = 1;
  for (const Spec& spec : all_specs()) {
    // What the cases exercised: Switch pass-through tokens, slots dropped for capacity,
    // inactive tokens.
    int64_t passed = 0, dropped = 0, inactive = 0;
    for (MlpKind kind : kMlpKinds) {
      for (Activation act : kActivations) {
        INFO(spec.name << ", " << (kind == MlpKind::kGlu ? "glu" : "mlp") << ", "
                       << to_string(act));
        const Model m = make_model(spec, kind, act, seed++);
        for (double p_inactive : {0.0, 0.25}) {
          INFO("inactive fraction " << p_inactive);
          const auto [in, ref] = inputs_without_ties(m, 24, seed++ * 1000, p_inactive);
          check_against_reference(m, in, ref);
          passed += std::count(ref.pass.begin(), ref.pass.end(), 1);
          inactive += std::count(in.active.begin(), in.active.end(), 0);
          for (size_t j = 0; j < ref.ids.size(); ++j) dropped += ref.ids[j] >= 0 && !ref.kept[j];
        }
      }
    }
    INFO(spec.name);
    CHECK(inactive > 0);
    const RouterConfig& c = spec.rc;
    const bool switch_cap = c.kind == RouterKind::kSwitch && c.expert_capacity > 0;
    CHECK((passed > 0) == (switch_cap && c.switch_passthrough));
    CHECK((dropped > 0) == (switch_cap || c.capacity_factor > 0));
  }
}

TEST_CASE("MoELayer: zero tokens, one token, experts with no tokens", "[moe][layer]") {
  uint32_t seed = 50;
  for (const Spec& spec : all_specs()) {
    INFO(spec.name);
    const Model m = make_model(spec, MlpKind::kGlu, Activation::kSilu, seed++);
    {  // T = 0
      Inputs in = make_inputs(m, 0, seed++);
      MoeWorkspace ws;
      const std::vector<float> y = run_layer(m.layer, in, 0, &ws);
      CHECK(y.empty());
      CHECK(ws.routing.tokens == 0);
      CHECK(ws.plan.rows() == 0);
    }
    {  // T = 1
      const auto [in, ref] = inputs_without_ties(m, 1, seed++ * 1000);
      check_against_reference(m, in, ref);
    }
    {  // 3 tokens over up to 16 experts: some experts get none
      const auto [in, ref] = inputs_without_ties(m, 3, seed++ * 1000);
      check_against_reference(m, in, ref);
      MoeWorkspace ws;
      run_layer(m.layer, in, 0, &ws);
      // (Expert choice gives every expert its C >= 1 tokens.)
      if (spec.rc.kind != RouterKind::kExpertChoice && spec.rc.num_experts > 3 * spec.rc.top_k) {
        CHECK(std::count(ws.routing.expert_load.begin(), ws.routing.expert_load.end(), 0) > 0);
      }
    }
  }
}

TEST_CASE("A quantized layer equals the layer of its dequantized weights, bit for bit",
          "[moe][layer]") {
  // Experts (and the shared expert) quantized: gate and up int4 asym g32, down int3 sym g32.
  const QuantScheme gate_up{4, QuantMode::kAsym, 32, ScaleType::kF16};
  const QuantScheme down{3, QuantMode::kSym, 32, ScaleType::kF16};
  uint32_t seed = 600;
  for (MlpKind kind : kMlpKinds) {
    INFO((kind == MlpKind::kGlu ? "glu" : "mlp"));
    Spec s = spec("qwen2_moe", rc(RouterKind::kSoftmaxTopK, 6, 2), 64, 96);
    s.shared_i = 64;
    s.shared_gated = true;
    Model m = make_model(s, kind, Activation::kSilu, seed++);
    // Quantize every expert MLP; keep the dequantized weights as the model's (for the reference).
    struct Parts {
      std::optional<QuantizedMatrix> gate;
      QuantizedMatrix up, down;
    };
    auto quantize_mlp = [&](MlpW& w) {
      auto q = [](const std::vector<float>& v, int64_t n, int64_t k, const QuantScheme& sc) {
        return quantize(MatrixView<const float>(v.data(), n, k), sc);
      };
      Parts p{{}, q(w.up, w.i, w.h, gate_up), q(w.down, w.h, w.i, down)};
      if (kind == MlpKind::kGlu) {
        p.gate = q(w.gate, w.i, w.h, gate_up);
        w.gate = dequantize(*p.gate);
      }
      w.up = dequantize(p.up);
      w.down = dequantize(p.down);
      return p;
    };
    std::vector<Parts> parts;
    for (MlpW& w : m.experts) parts.push_back(quantize_mlp(w));
    const Parts shared_parts = quantize_mlp(*m.shared);
    // variant: quantized or dequantized fp32 storage, gate and up fused or not.
    auto build = [&](bool quantized, bool fuse) {
      auto lin = [&](const QuantizedMatrix& q) {
        return quantized ? QuantizedLinear::from_quantized(q)
                         : QuantizedLinear::from_f32(dequantize(q), q.rows(), q.cols());
      };
      auto mlp = [&](const Parts& p) {
        if (kind == MlpKind::kMlp) {
          return std::make_shared<ExpertMLP>(
              ExpertMLP::mlp(lin(p.up), lin(p.down), Activation::kSilu));
        }
        auto e = std::make_shared<ExpertMLP>(
            ExpertMLP::glu(lin(*p.gate), lin(p.up), lin(p.down), Activation::kSilu, fuse));
        REQUIRE(e->fused() == fuse);
        return e;
      };
      std::vector<std::shared_ptr<const ExpertMLP>> experts;
      for (const Parts& p : parts) experts.push_back(mlp(p));
      return MoELayer(m.layer.router(), std::move(experts),
                      {SharedExpert{mlp(shared_parts), m.shared_gate}});
    };
    const auto [in, ref] = inputs_without_ties(m, 40, seed++ * 1000);
    for (CpuIsa isa : isas()) {
      INFO(to_string(isa));
      const test::ScopedCpuIsa cap(isa);  // kernels are chosen when a layer is built
      std::vector<std::vector<float>> ys;
      for (bool quantized : {true, false}) {
        for (bool fuse : {true, false}) {
          if (kind == MlpKind::kMlp && !fuse) continue;
          INFO("quantized " << quantized << " fused " << fuse);
          m.layer = build(quantized, fuse);
          if (quantized) {
            CHECK(m.layer.stats().weight_bytes * 4 < 2 * m.layer.stats().parameters * 4);
          }
          // Every variant matches the double-precision reference of the dequantized weights.
          check_against_reference(m, in, ref);
          ys.push_back(run_layer(m.layer, in));
        }
      }
      // Under the reference kernels all variants agree bit for bit.
      if (isa == CpuIsa::kReference) {
        for (size_t v = 1; v < ys.size(); ++v) {
          INFO("variant " << v);
          REQUIRE(same_bits(ys[v], ys[0]));
        }
      }
    }
  }
}

TEST_CASE("MoELayer gives identical results for 1, 2 and 3 threads", "[moe][layer]") {
  const CpuIsa isa = GENERATE(from_range(isas()));
  INFO(to_string(isa));
  const test::ScopedCpuIsa cap(isa);
  uint32_t seed = 300;
  for (const Spec& spec : all_specs()) {
    INFO(spec.name);
    Spec s = spec;
    s.seq.clear();  // 150 tokens: one sequence
    const Model m = make_model(s, MlpKind::kGlu, Activation::kGelu, seed++);
    const Inputs in = make_inputs(m, 150, seed++, 0.1);
    const std::vector<float> y1 = run_layer(m.layer, in, 1);
    for (int threads : {2, 3}) {
      const std::vector<float> y = run_layer(m.layer, in, threads);
      REQUIRE(same_bits(y, y1));
    }
  }
}

TEST_CASE("Inactive tokens give rows of 0 and skip the shared experts", "[moe][layer]") {
  Spec s = spec("qwen2_moe", rc(RouterKind::kSoftmaxTopK, 8, 2), 64, 96);
  s.shared_i = 64;
  s.shared_gated = true;
  s.residual = true;
  const Model m = make_model(s, MlpKind::kGlu, Activation::kSilu, 901);
  Inputs in = make_inputs(m, 30, 902, 0.4);
  REQUIRE(std::count(in.active.begin(), in.active.end(), 0) > 0);
  MoeWorkspace ws;
  const std::vector<float> y = run_layer(m.layer, in, 0, &ws);
  // The active tokens alone, compacted, give the same rows bit for bit (dropless routing).
  Inputs compact;
  for (int64_t t = 0; t < in.tokens; ++t) {
    if (in.active[t]) {
      compact.x.insert(compact.x.end(), in.x.begin() + t * s.h, in.x.begin() + (t + 1) * s.h);
      compact.tokens++;
    }
  }
  const std::vector<float> yc = run_layer(m.layer, compact);
  int64_t row = 0;
  for (int64_t t = 0; t < in.tokens; ++t) {
    const float* got = &y[t * s.h];
    if (!in.active[t]) {
      for (int64_t c = 0; c < s.h; ++c) REQUIRE(got[c] == 0.0f);
      for (int64_t j = 0; j < 2; ++j) REQUIRE(ws.routing.id(t, j) == -1);
    } else {
      REQUIRE(std::memcmp(got, &yc[row * s.h], size_t(s.h) * sizeof(float)) == 0);
      ++row;
    }
  }
  // Every token inactive: all zeros.
  in.active.assign(size_t(in.tokens), 0);
  const std::vector<float> yz = run_layer(m.layer, in);
  for (float v : yz) REQUIRE(v == 0.0f);
}

TEST_CASE("MoELayer::run checks the workspace and shapes", "[moe][layer]") {
  Spec s = spec("softmax_topk", rc(RouterKind::kSoftmaxTopK, 4, 2), 48, 64);
  const Model m = make_model(s, MlpKind::kGlu, Activation::kSilu, 5);
  const Inputs in = make_inputs(m, 5, 6);
  MoeWorkspace ws = m.layer.make_workspace(4);
  std::vector<float> y(size_t(5 * 48));
  CHECK_THROWS_WITH(m.layer.run(MatrixView<const float>(in.x.data(), 5, 48),
                                MatrixView<float>(y.data(), 5, 48), ws),
                    Catch::Contains("5 tokens exceed the workspace's 4"));
  CHECK_THROWS_WITH(m.layer.run(MatrixView<const float>(in.x.data(), 4, 48),
                                MatrixView<float>(y.data(), 3, 48), ws),
                    Catch::Contains("[4, 48]") && Catch::Contains("[3, 48]"));
  CHECK_THROWS_AS(m.layer.run(MatrixView<const float>(in.x.data(), 2, 40),
                              MatrixView<float>(y.data(), 2, 40), ws),
                  Error);
  CHECK_NOTHROW(m.layer.run(MatrixView<const float>(in.x.data(), 4, 48),
                            MatrixView<float>(y.data(), 4, 48), ws));
  CHECK_THROWS_AS(m.layer.make_workspace(-1), Error);
  // Construction errors name the mismatch.
  std::vector<std::shared_ptr<const ExpertMLP>> three(m.layer.experts().begin(),
                                                      m.layer.experts().begin() + 3);
  CHECK_THROWS_WITH(MoELayer(m.layer.router(), three),
                    Catch::Contains("3 experts for a router over 4"));
  std::mt19937 rng(1);
  auto other = build_mlp(random_mlp(MlpKind::kGlu, Activation::kSilu, 32, 64, rng));
  auto four = m.layer.experts();
  four[2] = other;
  CHECK_THROWS_WITH(MoELayer(m.layer.router(), four),
                    Catch::Contains("expert 2 has hidden size 32"));
  CHECK_THROWS_WITH(
      MoELayer(m.layer.router(), m.layer.experts(), {SharedExpert{four[0], std::vector<float>(7)}}),
      Catch::Contains("7 values, expected 48"));
}

TEST_CASE("extract_task: the task's sub-network gives the same outputs with fewer bytes",
          "[moe][layer]") {
  Spec s = spec("task", rc(RouterKind::kTask, 8, 3), 64, 96);
  s.tasks = 4;
  s.shared_i = 64;
  s.residual = true;
  for (MlpKind kind : kMlpKinds) {
    const Model m = make_model(s, kind, Activation::kRelu, 4242);
    for (int32_t task = 0; task < 4; ++task) {
      INFO("task " << task);
      const MoELayer sub = m.layer.extract_task(task);
      CHECK(sub.num_experts() == 3);
      CHECK(sub.router().kind() == RouterKind::kTask);
      const auto& route = m.spec.rc.tasks[task];
      for (int64_t j = 0; j < 3; ++j) CHECK(&sub.expert(j) == &m.layer.expert(route.experts[j]));
      const LayerStats full = m.layer.stats(), part = sub.stats();
      CHECK(part.experts == 3);
      CHECK(full.experts == 8);
      const int64_t expert_bytes = m.layer.expert(0).weight_bytes();
      CHECK(full.weight_bytes - part.weight_bytes == 5 * expert_bytes);
      CHECK(part.parameters < full.parameters);
      Inputs in = make_inputs(m, 17, 100 + task);
      in.task_ids.clear();
      in.task_id = task;
      const std::vector<float> y_full = run_layer(m.layer, in);
      Inputs sub_in = in;
      sub_in.task_id = 0;
      const std::vector<float> y_sub = run_layer(sub, sub_in);
      REQUIRE(same_bits(y_full, y_sub));
      // And both match the reference.
      check_against_reference(m, in, ref_route(m, in));
    }
    CHECK_THROWS_WITH(m.layer.extract_task(4), Catch::Contains("task 4"));
    CHECK_THROWS_WITH(m.layer.extract_task(-1), Catch::Contains("task -1"));
  }
  const Model plain = make_model(spec("mixtral", rc(RouterKind::kMixtral, 4, 2), 48, 64),
                                 MlpKind::kGlu, Activation::kSilu, 3);
  CHECK_THROWS_WITH(plain.layer.extract_task(0), Catch::Contains("mixtral"));
}

TEST_CASE("One const MoELayer run from 8 threads at once equals serial runs", "[moe][layer]") {
  const CpuIsa isa = GENERATE(from_range(isas()));
  INFO(to_string(isa));
  const test::ScopedCpuIsa cap(isa);
  Spec s = spec("deepseek_v3", rc(RouterKind::kDeepSeekV3, 16, 4), 64, 96);
  s.rc.n_group = 4;
  s.rc.topk_group = 2;
  s.rc.norm_topk_prob = true;
  s.rc.routed_scaling_factor = 2.5f;
  s.shared_i = 96;
  const Model m = make_model(s, MlpKind::kGlu, Activation::kSilu, 8080);
  const MoELayer& layer = m.layer;
  constexpr int kThreads = 8;
  std::vector<Inputs> inputs;
  std::vector<std::vector<float>> serial;
  for (int i = 0; i < kThreads; ++i) {
    inputs.push_back(make_inputs(m, 20 + 7 * i, 9000 + i, i % 2 ? 0.2 : 0.0));
    serial.push_back(run_layer(layer, inputs.back(), 1 + i % 2));
  }
  std::vector<std::vector<float>> parallel(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      MoeWorkspace ws = layer.make_workspace(inputs[i].tokens);
      std::vector<float>& y = parallel[i];
      y.assign(size_t(inputs[i].tokens * s.h), 0.0f);
      for (int rep = 0; rep < 3; ++rep) {  // reuse the workspace
        layer.run(MatrixView<const float>(inputs[i].x.data(), inputs[i].tokens, s.h),
                  MatrixView<float>(y.data(), inputs[i].tokens, s.h), ws,
                  inputs[i].options(1 + i % 2));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    INFO("thread " << i);
    REQUIRE(same_bits(parallel[i], serial[i]));
  }
}

namespace {

// A router the library does not have: token t goes to experts t mod E and (t + 3) mod E with
// weights 0.625 and 0.375 (a RouterLike type, used without forking the layer).
struct RoundRobinRouter {
  int64_t experts = 0;
  void route(MatrixView<const float> x, Routing& out, const RouteOptions&) const {
    out.reset(x.rows(), 2, experts);
    for (int64_t t = 0; t < x.rows(); ++t) {
      out.ids[t * 2] = static_cast<int32_t>(t % experts);
      out.ids[t * 2 + 1] = static_cast<int32_t>((t + 3) % experts);
      out.weights[t * 2] = 0.625f;
      out.weights[t * 2 + 1] = 0.375f;
      out.kept[t * 2] = out.kept[t * 2 + 1] = 1;
    }
  }
};
static_assert(RouterLike<RoundRobinRouter> && RouterLike<Router>);

}  // namespace

TEST_CASE("MoELayer runs on a given routing or with a custom router", "[moe][layer]") {
  Spec s = spec("softmax_topk", rc(RouterKind::kSoftmaxTopK, 8, 2), 64, 96);
  s.shared_i = 32;  // the tail runs on the given routing too
  const Model m = make_model(s, MlpKind::kGlu, Activation::kSilu, 900);
  const Inputs in = make_inputs(m, 19, 901);
  const int64_t t = in.tokens, h = s.h;
  const MatrixView<const float> x(in.x.data(), t, h);
  MoeWorkspace ws = m.layer.make_workspace(t);
  // The layer's own routing, given back: the same result, bit for bit.
  std::vector<float> y0(in.x.size()), y1(in.x.size());
  m.layer.run(x, MatrixView<float>(y0.data(), t, h), ws);
  const Routing own = ws.routing;
  MoeWorkspace ws2 = m.layer.make_workspace(t);
  MoeRunOptions o;
  o.routing = &own;
  m.layer.run(x, MatrixView<float>(y1.data(), t, h), ws2, o);
  CHECK(same_bits(y0, y1));
  CHECK(ws2.routing.ids != own.ids);  // left as it was: the router did not run

  // A custom router: y_t = 0.625 E_{t mod 8}(x_t) + 0.375 E_{t+3 mod 8}(x_t) + shared(x_t).
  const RoundRobinRouter rr{8};
  std::vector<float> y2(in.x.size());
  m.layer.run(rr, x, MatrixView<float>(y2.data(), t, h), ws);
  std::vector<double> ref(in.x.size());
  for (int64_t i = 0; i < t; ++i) {
    const float* xt = in.x.data() + i * h;
    const auto a = ref_mlp(m.experts[static_cast<size_t>(i % 8)], xt);
    const auto b = ref_mlp(m.experts[static_cast<size_t>((i + 3) % 8)], xt);
    const auto c = ref_mlp(*m.shared, xt);
    for (int64_t k = 0; k < h; ++k) ref[i * h + k] = 0.625 * a[k] + 0.375 * b[k] + c[k];
  }
  CHECK(rel_error(y2, ref) < 1e-5);
  CHECK(ws.routing.ids[2] == 1);  // the custom router's routing is in ws.routing

  // A given routing is checked against the run.
  Routing bad = own;
  bad.ids[5] = 8;
  o.routing = &bad;
  CHECK_THROWS_WITH(
      m.layer.run(x, MatrixView<float>(y1.data(), t, h), ws2, o),
      Catch::Contains("slot 1 of token 2 of the given routing keeps expert 8 (of 8)"));
  Routing short_routing;
  short_routing.reset(t - 1, 2, 8);
  o.routing = &short_routing;
  CHECK_THROWS_WITH(m.layer.run(x, MatrixView<float>(y1.data(), t, h), ws2, o),
                    Catch::Contains("the given routing is for 18 tokens over 8 experts"));
}
